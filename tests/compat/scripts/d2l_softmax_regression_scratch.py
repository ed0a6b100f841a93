# Source: Dive into Deep Learning (PyTorch edition), "Implementation of Softmax Regression from Scratch",
#   https://d2l.ai/chapter_linear-networks/softmax-regression-scratch.html
#   (text: d2l-ai/d2l-zh, chapter_linear-networks/softmax-regression-scratch.md, the `#@tab pytorch`
#   and `#@tab all` cells in order; comments translated to English).
# Changed lines:
#   - `import torch` -> `import engine as torch`; `from d2l import torch as d2l` and
#     `from IPython import display` removed.
#   - Dataset: `d2l.load_data_fashion_mnist(batch_size)` -> `load_data_digits(batch_size)` (8x8 digits,
#     tests/compat/books_data.py), so `num_inputs = 784` -> `num_inputs = 64`; `batch_size = 256` ->
#     `batch_size = 32` (1437 training images instead of 60000: more steps per epoch).
#   - d2l's torch aliases inlined as d2l's torch.py defines them: d2l.tensor -> torch.tensor,
#     d2l.normal -> torch.normal, d2l.exp -> torch.exp, d2l.log -> torch.log, d2l.matmul ->
#     torch.matmul, d2l.reshape(x, s) -> x.reshape(s), d2l.reduce_sum(x, ...) -> x.sum(...),
#     d2l.argmax(x, ...) -> x.argmax(...), d2l.astype(x, t) -> x.type(t), d2l.size(x) -> x.numel();
#     d2l.sgd inlined from the linear-regression-scratch section.
#   - Animator: the plotting class is replaced by one that prints each epoch's metrics (no
#     matplotlib); the prediction cell (predict_ch3, which only draws images) is left out.
#   - Added: torch.manual_seed(0) (the book does not seed) and the final `print('RESULT', ...)`.
import engine as torch
from books_data import load_data_digits

torch.manual_seed(0)

batch_size = 32
train_iter, test_iter = load_data_digits(batch_size)

num_inputs = 64
num_outputs = 10

W = torch.normal(0, 0.01, size=(num_inputs, num_outputs), requires_grad=True)
b = torch.zeros(num_outputs, requires_grad=True)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
X.sum(0, keepdim=True), X.sum(1, keepdim=True)


def softmax(X):
    X_exp = torch.exp(X)
    partition = X_exp.sum(1, keepdim=True)
    return X_exp / partition  # The broadcasting mechanism is applied here


X = torch.normal(0, 1, (2, 5))
X_prob = softmax(X)
X_prob, X_prob.sum(1)


def net(X):
    return softmax(torch.matmul(X.reshape((-1, W.shape[0])), W) + b)


y = torch.tensor([0, 2])
y_hat = torch.tensor([[0.1, 0.3, 0.6], [0.3, 0.2, 0.5]])
y_hat[[0, 1], y]


def cross_entropy(y_hat, y):
    return - torch.log(y_hat[range(len(y_hat)), y])


cross_entropy(y_hat, y)


def accuracy(y_hat, y):  #@save
    """Compute the number of correct predictions."""
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


assert accuracy(y_hat, y) / len(y) == 0.5


def evaluate_accuracy(net, data_iter):  #@save
    """Compute the accuracy for a model on a dataset."""
    if isinstance(net, torch.nn.Module):
        net.eval()  # Set the model to evaluation mode
    metric = Accumulator(2)  # No. of correct predictions, no. of predictions
    with torch.no_grad():
        for X, y in data_iter:
            metric.add(accuracy(net(X), y), y.numel())
    return metric[0] / metric[1]


class Accumulator:  #@save
    """For accumulating sums over `n` variables."""
    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self):
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


evaluate_accuracy(net, test_iter)


def train_epoch_ch3(net, train_iter, loss, updater):  #@save
    """The training loop defined in Chapter 3."""
    # Set the model to training mode
    if isinstance(net, torch.nn.Module):
        net.train()
    # Sum of training loss, sum of training accuracy, no. of examples
    metric = Accumulator(3)
    for X, y in train_iter:
        # Compute gradients and update parameters
        y_hat = net(X)
        l = loss(y_hat, y)
        if isinstance(updater, torch.optim.Optimizer):
            # Using PyTorch in-built optimizer & loss criterion
            updater.zero_grad()
            l.mean().backward()
            updater.step()
        else:
            # Using custom built optimizer & loss criterion
            l.sum().backward()
            updater(X.shape[0])
        metric.add(float(l.sum()), accuracy(y_hat, y), y.numel())
    # Return training loss and training accuracy
    return metric[0] / metric[2], metric[1] / metric[2]


class Animator:  # changed: prints instead of plotting
    def __init__(self, xlabel=None, ylabel=None, legend=None, **kwargs):
        self.legend = legend or []

    def add(self, x, y):
        print(x, ', '.join(f'{name} {value:.3f}' for name, value in zip(self.legend, y)))


def train_ch3(net, train_iter, test_iter, loss, num_epochs, updater):  #@save
    """Train a model (defined in Chapter 3)."""
    animator = Animator(xlabel='epoch', xlim=[1, num_epochs], ylim=[0.3, 0.9],
                        legend=['train loss', 'train acc', 'test acc'])
    for epoch in range(num_epochs):
        train_metrics = train_epoch_ch3(net, train_iter, loss, updater)
        test_acc = evaluate_accuracy(net, test_iter)
        animator.add(epoch + 1, train_metrics + (test_acc,))
    train_loss, train_acc = train_metrics
    assert train_loss < 0.5, train_loss
    assert train_acc <= 1 and train_acc > 0.7, train_acc
    assert test_acc <= 1 and test_acc > 0.7, test_acc
    print('RESULT', train_loss, train_acc, test_acc)  # added


def sgd(params, lr, batch_size):  #@save
    """Minibatch stochastic gradient descent."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


lr = 0.1


def updater(batch_size):
    return sgd([W, b], lr, batch_size)


num_epochs = 10
train_ch3(net, train_iter, test_iter, cross_entropy, num_epochs, updater)

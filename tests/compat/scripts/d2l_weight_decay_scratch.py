# Source: Dive into Deep Learning (PyTorch edition), "Weight Decay", sections "Data" and
#   "Implementation from Scratch", https://d2l.ai/chapter_multilayer-perceptrons/weight-decay.html
#   (text: d2l-ai/d2l-zh, chapter_multilayer-perceptrons/weight-decay.md, the `#@tab pytorch` and
#   `#@tab all` cells in order, "Concise Implementation" included; comments translated to English).
# Changed lines:
#   - `import torch` -> `import engine as torch`; `from torch import nn` -> `from engine import nn`;
#     `from d2l import torch as d2l` removed.
#   - The d2l helpers the chapter uses are inlined from the book's own `#@save` text:
#     synthetic_data, load_array, linreg, squared_loss, sgd (linear-regression chapters),
#     Accumulator (softmax-regression-scratch), evaluate_loss (underfit-overfit); each `d2l.X`
#     call -> `X`. d2l's torch aliases: d2l.ones -> torch.ones, d2l.reshape(x, s) -> x.reshape(s),
#     d2l.reduce_sum(x) -> x.sum(), d2l.size(x) -> x.numel().
#   - d2l.Animator: replaced by one that records and prints (no matplotlib).
#   - Added: torch.manual_seed(0) (the book does not seed), `return` of the final norm from
#     `train` and `train_concise`, and the final `print('RESULT', ...)`.
import engine as torch
from engine import nn
from engine.utils import data

torch.manual_seed(0)


def synthetic_data(w, b, num_examples):  #@save
    """Generate y = Xw + b + noise."""
    X = torch.normal(0, 1, (num_examples, len(w)))
    y = torch.matmul(X, w) + b
    y += torch.normal(0, 0.01, y.shape)
    return X, y.reshape((-1, 1))


def load_array(data_arrays, batch_size, is_train=True):  #@save
    """Construct a PyTorch data iterator."""
    dataset = data.TensorDataset(*data_arrays)
    return data.DataLoader(dataset, batch_size, shuffle=is_train)


def linreg(X, w, b):  #@save
    """The linear regression model."""
    return torch.matmul(X, w) + b


def squared_loss(y_hat, y):  #@save
    """Squared loss."""
    return (y_hat - y.reshape(y_hat.shape)) ** 2 / 2


def sgd(params, lr, batch_size):  #@save
    """Minibatch stochastic gradient descent."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


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


def evaluate_loss(net, data_iter, loss):  #@save
    """Evaluate the loss of a model on the given dataset."""
    metric = Accumulator(2)  # Sum of losses, no. of examples
    for X, y in data_iter:
        out = net(X)
        y = y.reshape(out.shape)
        l = loss(out, y)
        metric.add(l.sum(), l.numel())
    return metric[0] / metric[1]


class Animator:  # changed: records and prints instead of plotting
    def __init__(self, xlabel=None, ylabel=None, legend=None, **kwargs):
        self.legend, self.points = legend or [], []

    def add(self, x, y):
        self.points.append((x, *y))
        print(x, ', '.join(f'{name} {value:.6f}' for name, value in zip(self.legend, y)))


n_train, n_test, num_inputs, batch_size = 20, 100, 200, 5
true_w, true_b = torch.ones((num_inputs, 1)) * 0.01, 0.05
train_data = synthetic_data(true_w, true_b, n_train)
train_iter = load_array(train_data, batch_size)
test_data = synthetic_data(true_w, true_b, n_test)
test_iter = load_array(test_data, batch_size, is_train=False)


def init_params():
    w = torch.normal(0, 1, size=(num_inputs, 1), requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    return [w, b]


def l2_penalty(w):
    return torch.sum(w.pow(2)) / 2


def train(lambd):
    w, b = init_params()
    net, loss = lambda X: linreg(X, w, b), squared_loss
    num_epochs, lr = 100, 0.003
    animator = Animator(xlabel='epochs', ylabel='loss', yscale='log',
                        xlim=[5, num_epochs], legend=['train', 'test'])
    for epoch in range(num_epochs):
        for X, y in train_iter:
            # The L2 norm penalty term has been added, and broadcasting
            # makes `l2_penalty(w)` a vector whose length is `batch_size`
            l = loss(net(X), y) + lambd * l2_penalty(w)
            l.sum().backward()
            sgd([w, b], lr, batch_size)
        if (epoch + 1) % 5 == 0:
            animator.add(epoch + 1, (evaluate_loss(net, train_iter, loss),
                                     evaluate_loss(net, test_iter, loss)))
    print('L2 norm of w:', torch.norm(w).item())
    return torch.norm(w).item(), animator.points[-1]  # added


norm_plain, (_, train_plain, test_plain) = train(lambd=0)
norm_decay, (_, train_decay, test_decay) = train(lambd=3)


def train_concise(wd):
    net = nn.Sequential(nn.Linear(num_inputs, 1))
    for param in net.parameters():
        param.data.normal_()
    loss = nn.MSELoss()
    num_epochs, lr = 100, 0.003
    # The bias parameter is not decayed.
    trainer = torch.optim.SGD([
        {"params":net[0].weight,'weight_decay': wd},
        {"params":net[0].bias}], lr=lr)
    animator = Animator(xlabel='epochs', ylabel='loss', yscale='log',
                        xlim=[5, num_epochs], legend=['train', 'test'])
    for epoch in range(num_epochs):
        for X, y in train_iter:
            trainer.zero_grad()
            l = loss(net(X), y)
            l.backward()
            trainer.step()
        if (epoch + 1) % 5 == 0:
            animator.add(epoch + 1, (evaluate_loss(net, train_iter, loss),
                                     evaluate_loss(net, test_iter, loss)))
    print('L2 norm of w:', net[0].weight.norm().item())
    return net[0].weight.norm().item(), animator.points[-1]  # added


concise_plain, (_, _, concise_test_plain) = train_concise(0)
concise_decay, (_, _, concise_test_decay) = train_concise(3)
print('RESULT', norm_plain, norm_decay, train_plain, test_plain, train_decay, test_decay,
      concise_plain, concise_decay, concise_test_plain, concise_test_decay)

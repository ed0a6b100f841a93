# Source: Dive into Deep Learning (PyTorch edition), "Dropout", sections "Implementation from Scratch"
#   and "Concise Implementation", https://d2l.ai/chapter_multilayer-perceptrons/dropout.html
#   (text: d2l-ai/d2l-zh, chapter_multilayer-perceptrons/dropout.md, the `#@tab pytorch` cells in
#   order; comments translated to English).
# Changed lines:
#   - `import torch` -> `import engine as torch`; `from torch import nn` -> `from engine import nn`;
#     `from d2l import torch as d2l` removed.
#   - Dataset: `d2l.load_data_fashion_mnist(batch_size)` -> `load_data_digits(batch_size)` (8x8 digits,
#     tests/compat/books_data.py), so `num_inputs = 784` -> `64` and `nn.Linear(784, 256)` ->
#     `nn.Linear(64, 256)`; `batch_size = 256` -> `batch_size = 32` (1437 training images instead of
#     60000: more steps per epoch).
#   - d2l.train_ch3 and what it uses (accuracy, evaluate_accuracy, Accumulator, train_epoch_ch3) are
#     inlined from the book's softmax-regression-scratch text, with d2l's torch aliases
#     (d2l.argmax(x, ...) -> x.argmax(...), d2l.astype(x, t) -> x.type(t), d2l.reduce_sum(x) ->
#     x.sum(), d2l.size(x) -> x.numel()); d2l.Animator replaced by one that prints.
#   - Added: torch.manual_seed(0) (the book does not seed), a `print('RESULT', ...)` in train_ch3,
#     and the checks on dropout_layer's output after its demo cell.
import engine as torch
from engine import nn
from books_data import load_data_digits

torch.manual_seed(0)


def dropout_layer(X, dropout):
    assert 0 <= dropout <= 1
    # In this case, all elements are dropped out
    if dropout == 1:
        return torch.zeros_like(X)
    # In this case, all elements are kept
    if dropout == 0:
        return X
    mask = (torch.rand(X.shape) > dropout).float()
    return mask * X / (1.0 - dropout)


X= torch.arange(16, dtype = torch.float32).reshape((2, 8))
print(X)
print(dropout_layer(X, 0.))
print(dropout_layer(X, 0.5))
print(dropout_layer(X, 1.))
# added: what the printed rows show
half = dropout_layer(X, 0.5)
assert bool(((half == 0) | (half == 2 * X)).all()) and float(dropout_layer(X, 1.).abs().sum()) == 0

num_inputs, num_outputs, num_hiddens1, num_hiddens2 = 64, 10, 256, 256

dropout1, dropout2 = 0.2, 0.5

class Net(nn.Module):
    def __init__(self, num_inputs, num_outputs, num_hiddens1, num_hiddens2,
                 is_training = True):
        super(Net, self).__init__()
        self.num_inputs = num_inputs
        self.training = is_training
        self.lin1 = nn.Linear(num_inputs, num_hiddens1)
        self.lin2 = nn.Linear(num_hiddens1, num_hiddens2)
        self.lin3 = nn.Linear(num_hiddens2, num_outputs)
        self.relu = nn.ReLU()

    def forward(self, X):
        H1 = self.relu(self.lin1(X.reshape((-1, self.num_inputs))))
        # Use dropout only when training the model
        if self.training == True:
            # Add a dropout layer after the first fully connected layer
            H1 = dropout_layer(H1, dropout1)
        H2 = self.relu(self.lin2(H1))
        if self.training == True:
            # Add a dropout layer after the second fully connected layer
            H2 = dropout_layer(H2, dropout2)
        out = self.lin3(H2)
        return out


net = Net(num_inputs, num_outputs, num_hiddens1, num_hiddens2)


def accuracy(y_hat, y):  #@save
    """Compute the number of correct predictions."""
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


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


num_epochs, lr, batch_size = 10, 0.5, 32
loss = nn.CrossEntropyLoss()
train_iter, test_iter = load_data_digits(batch_size)
trainer = torch.optim.SGD(net.parameters(), lr=lr)
train_ch3(net, train_iter, test_iter, loss, num_epochs, trainer)

net = nn.Sequential(nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        # Add a dropout layer after the first fully connected layer
        nn.Dropout(dropout1),
        nn.Linear(256, 256),
        nn.ReLU(),
        # Add a dropout layer after the second fully connected layer
        nn.Dropout(dropout2),
        nn.Linear(256, 10))

def init_weights(m):
    if type(m) == nn.Linear:
        nn.init.normal_(m.weight, std=0.01)

net.apply(init_weights);

trainer = torch.optim.SGD(net.parameters(), lr=lr)
train_ch3(net, train_iter, test_iter, loss, num_epochs, trainer)

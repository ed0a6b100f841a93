# Source: pytorch/tutorials, beginner_source/basics/optimization_tutorial.py
#   (commit 802d68671f544c32347a2f1e780b80fcc2d8c9e7), "Optimizing Model Parameters".
# Changed lines:
#   import torch                                  -> import engine as torch
#   from torch import nn                          -> from engine import nn
#   from torch.utils.data import DataLoader       -> from engine.utils.data import DataLoader
#   from torchvision import datasets              -> from tests.compat.datasets import DigitsMNIST
#   from torchvision.transforms import ToTensor   -> from tests.compat.datasets import ToTensor
#   datasets.FashionMNIST( (twice)                -> DigitsMNIST( (the bundled digits drawn as 28x28
#     images, 1,497 train / 300 test, see tests/compat/datasets.py)
#   epochs = 10 (the second one, the loop's) -> epochs = 20: the digits train set is 40x smaller than
#     FashionMNIST's, so 10 epochs would be only 240 SGD steps at lr=1e-3
# The tutorial's prose (the long comment blocks between code cells) is left out; every code line is
# verbatim and in order.

import engine as torch
from engine import nn
from engine.utils.data import DataLoader
from tests.compat.datasets import DigitsMNIST
from tests.compat.datasets import ToTensor

training_data = DigitsMNIST(
    root="data",
    train=True,
    download=True,
    transform=ToTensor()
)

test_data = DigitsMNIST(
    root="data",
    train=False,
    download=True,
    transform=ToTensor()
)

train_dataloader = DataLoader(training_data, batch_size=64)
test_dataloader = DataLoader(test_data, batch_size=64)

class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28*28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits

model = NeuralNetwork()


learning_rate = 1e-3
batch_size = 64
epochs = 5



# Initialize the loss function
loss_fn = nn.CrossEntropyLoss()



optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)


def train_loop(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    # Set the model to training mode - important for batch normalization and dropout layers
    # Unnecessary in this situation but added for best practices
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        # Compute prediction and loss
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        if batch % 100 == 0:
            loss, current = loss.item(), batch * batch_size + len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


def test_loop(dataloader, model, loss_fn):
    # Set the model to evaluation mode - important for batch normalization and dropout layers
    # Unnecessary in this situation but added for best practices
    model.eval()
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    test_loss, correct = 0, 0

    # Evaluating the model with torch.no_grad() ensures that no gradients are computed during test mode
    # also serves to reduce unnecessary gradient computations and memory usage for tensors with requires_grad=True
    with torch.no_grad():
        for X, y in dataloader:
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()

    test_loss /= num_batches
    correct /= size
    print(f"Test Error: \n Accuracy: {(100*correct):>0.1f}%, Avg loss: {test_loss:>8f} \n")


loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)

epochs = 20
for t in range(epochs):
    print(f"Epoch {t+1}\n-------------------------------")
    train_loop(train_dataloader, model, loss_fn, optimizer)
    test_loop(test_dataloader, model, loss_fn)
print("Done!")

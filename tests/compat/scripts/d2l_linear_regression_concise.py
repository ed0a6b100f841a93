# Source: Dive into Deep Learning (PyTorch edition), "Concise Implementation of Linear Regression",
#   https://d2l.ai/chapter_linear-networks/linear-regression-concise.html
#   (text: d2l-ai/d2l-zh, chapter_linear-networks/linear-regression-concise.md, the `#@tab pytorch`
#   and `#@tab all` cells in order; comments translated to English).
# Changed lines:
#   - `import torch` -> `import engine as torch`; `from torch.utils import data` ->
#     `from engine.utils import data`; `from torch import nn` -> `from engine import nn`;
#     `from d2l import torch as d2l` removed.
#   - d2l.synthetic_data inlined from the scratch chapter's `#@save` cell; d2l.tensor -> torch.tensor,
#     d2l.reshape(x, s) -> x.reshape(s).
#   - Added: torch.manual_seed(0) (the book does not seed), and the final `print('RESULT', ...)`.
import engine as torch
from engine.utils import data

torch.manual_seed(0)


def synthetic_data(w, b, num_examples):  #@save
    """Generate y = Xw + b + noise."""
    X = torch.normal(0, 1, (num_examples, len(w)))
    y = torch.matmul(X, w) + b
    y += torch.normal(0, 0.01, y.shape)
    return X, y.reshape((-1, 1))


true_w = torch.tensor([2, -3.4])
true_b = 4.2
features, labels = synthetic_data(true_w, true_b, 1000)


def load_array(data_arrays, batch_size, is_train=True):  #@save
    """Construct a PyTorch data iterator."""
    dataset = data.TensorDataset(*data_arrays)
    return data.DataLoader(dataset, batch_size, shuffle=is_train)


batch_size = 10
data_iter = load_array((features, labels), batch_size)

next(iter(data_iter))

# nn is an abbreviation for neural networks
from engine import nn
net = nn.Sequential(nn.Linear(2, 1))

net[0].weight.data.normal_(0, 0.01)
net[0].bias.data.fill_(0)

loss = nn.MSELoss()

trainer = torch.optim.SGD(net.parameters(), lr=0.03)

num_epochs = 3
for epoch in range(num_epochs):
    for X, y in data_iter:
        l = loss(net(X) ,y)
        trainer.zero_grad()
        l.backward()
        trainer.step()
    l = loss(net(features), labels)
    print(f'epoch {epoch + 1}, loss {l:f}')

w = net[0].weight.data
print('error in estimating w:', true_w - w.reshape(true_w.shape))
b = net[0].bias.data
print('error in estimating b:', true_b - b)
print('RESULT', float((true_w - w.reshape(true_w.shape)).abs().max()), float((true_b - b).abs().max()), float(l))

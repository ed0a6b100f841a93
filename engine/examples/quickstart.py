"""The README's example: a two-layer network built from core ops, trained with plain SGD.

Runs on the best available device (CUDA when cupy finds a GPU, else the CPU):

    python -m engine.examples.quickstart
"""

import engine
import engine.functional as F
from engine.examples import argument_parser


def main(steps: int = 200, seed: int = 0) -> float:
    engine.manual_seed(seed)
    device = engine.best_device()
    # Two interleaved spirals' worth of toy data: label = sign of x0 * x1.
    x = engine.randn(512, 2, device=device)
    y = ((x[:, 0] * x[:, 1]).numpy() > 0).astype("int64")
    y = engine.tensor(y, device=device)
    w1 = (engine.randn(32, 2, device=device) * 0.5).requires_grad_()
    b1 = engine.zeros(32, device=device, requires_grad=True)
    w2 = (engine.randn(2, 32, device=device) * 0.2).requires_grad_()
    b2 = engine.zeros(2, device=device, requires_grad=True)
    params = [w1, b1, w2, b2]
    for step in range(steps):
        hidden = F.linear_relu(x, w1, b1)  # fused linear + ReLU kernel
        loss = F.cross_entropy(F.linear(hidden, w2, b2), y)  # fused softmax-CE kernel
        for p in params:
            p.grad = None
        loss.backward()
        with engine.no_grad():
            for p in params:
                p.sub_(p.grad * 0.5)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  device {device}")
    return loss.item()


def _cli(argv=None) -> float:
    parser = argument_parser("quickstart", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="SGD steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data and weights)")
    args = parser.parse_args(argv)
    return main(steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    _cli()

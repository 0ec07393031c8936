"""Benchmark: the cU-Net against a U-Net, trained on equal terms (digits 8×8 or MNIST 28×28).

Both networks are trained by the same loop (train.loop.fit), objective (EDM loss), σ sampling,
seed, number of steps, batch and learning rate; then, side by side:

- parameters and FLOPs of one forward pass of one image (nets/flops.py, attention included);
- wall time of one forward pass and of one training step (medians of interleaved repeats, so a
  load spike on a shared machine hits both networks), on this device at the given thread count,
  and the wall time of each whole training run;
- Fréchet distance (digit-classifier features) of N samples (Heun, 35 NFE, per-sample seeds)
  after equal training steps, and after equal wall time: the network that is slower per step
  is trained again, from scratch, for steps · t_fast / t_slow steps (t: median step time),
  which fit into the time the faster network took for its steps;
- one-step denoising PSNR of D(x0 + σε; σ) on held-out images at σ ∈ {0.1, 0.2, 0.5}
  (one call; no best-along-a-trajectory oracle);
- the goals (cU-Net paper): ≤ 30% of the U-Net's parameters, ≤ 40% of its FLOPs, Fréchet distance
  within 10% (cU-Net FD ≤ 1.1 × U-Net FD), each with its figure and met / missed.

--dataset digits (default): the digits U-Net (DIGITS_UNET) against the default CUNet(), 500 steps,
batch 128, not saved; writes benchmarks/results/nets.json (nets_quick.json with --quick).

--dataset mnist: both networks are trained here, unconditional, on the 9,000 MNIST training
images (not the bench models: this compares two architectures). The U-Net is the bench models'
MNIST_UNET (benchmarks/mnist_models.py: widths 32/64/128, attention at 7×7, 2.85 M parameters);
the cU-Net is sized as on the digits: half the U-Net's first width, doubling per level (16/32/64),
attention at the two lowest resolutions (14, 7), the U-Net's 128-wide conditioning embedding
(MNIST_CUNET below). Batch 64, lr 2e-3 (the bench models' recipe), 1,000 steps each by default.
Models go to --run-dir (default runs/bench/nets-mnist, -quick / -cuda suffixed), one folder per
network and step count: a finished model is loaded, an interrupted one resumes from its checkpoints
(exactly), and the measured step times are kept in timing.json so a rerun plans the same equal-time
run. Writes benchmarks/results/nets_mnist.json (nets_mnist_quick.json) with "dataset": "mnist" and
sample grids nets_mnist_<net>[_quick].png. Needs MNIST cached (`make data`). The bench models'
--runs option does not apply: this script trains its own networks.

    python benchmarks/nets.py [--quick] [--dataset digits|mnist] [--steps N] [--batch-size B] [--n N]
                              [--threads T] [--device cpu|cuda] [--run-dir DIR] [--out PATH]

Full MNIST run on a 2-core CPU (about 60–80 minutes for both networks together: about 45 min of
training at ~1.5 s (U-Net) and ~0.6 s (cU-Net) per step, the U-Net retrained for the cU-Net's time,
then 3 × 1,000 samples at 35 NFE; the script prints its own estimate once it has timed a step):

    OMP_NUM_THREADS=2 python benchmarks/nets.py --dataset mnist --threads 2

On a GPU: `python benchmarks/nets.py --dataset mnist --device cuda` (models in runs/bench/nets-mnist-cuda).
Smoke run (a few minutes, not numbers to quote): `python benchmarks/nets.py --quick --dataset mnist`.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mnist_models import MNIST_LR, device_name, sample_images

from difflab.apps.demo.cunet import cost_table, one_step_psnr
from difflab.apps.demo.datasets import MNIST_BATCH, MNIST_CUNET, MNIST_UNET
from difflab.apps.demo.run import DIGITS_BATCH, DIGITS_STEPS, DIGITS_UNET, cached_model, heun_sigmas
from difflab.core.io import write_json
from difflab.core.wrappers import EDMDenoiser
from difflab.data import load_digits, load_mnist
from difflab.metrics import digits_frechet, digits_frechet_floor, frechet_floor
from difflab.metrics import frechet as dataset_frechet
from difflab.nets import CUNet, UNet
from difflab.nets.flops import count_flops, example_inputs
from difflab.sampling import sample, seeded_noise
from difflab.train.denoiser import DenoiserConfig, edm_loss, train_denoiser

RESULTS = Path(__file__).parent / "results"
# the digits pairing (CUNet() against DIGITS_UNET) and its scaling to 28×28 (difflab.apps.demo.datasets.MNIST_CUNET:
# widths 16/32/64, half the U-Net's first width, doubling; attention at the two lowest resolutions; embedding 4 × 32)
NETS = {"digits": {"unet": lambda: UNet(**DIGITS_UNET), "cunet": lambda: CUNet()},
        "mnist": {"unet": lambda: UNet(**MNIST_UNET), "cunet": lambda: CUNet(**MNIST_CUNET)}}
GOALS = {"params": 0.30, "flops": 0.40, "frechet": 1.10}   # cU-Net / U-Net at most
MNIST_STEPS, MNIST_QUICK_STEPS = 1000, 10
CHECKPOINT_EVERY = 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and samples: checks the script runs")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (digits {DIGITS_STEPS}, quick 40; mnist {MNIST_STEPS}, quick "
                             f"{MNIST_QUICK_STEPS})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"digits {DIGITS_BATCH}; mnist {MNIST_BATCH}")
    parser.add_argument("--n", type=int, default=None,
                        help="samples for the Fréchet distance (default 1000; quick: digits 300, mnist 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="mnist: model folder (default runs/bench/nets-mnist[-quick][-cuda])")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    mnist = args.dataset == "mnist"
    default_steps = {(False, False): DIGITS_STEPS, (False, True): 40, (True, False): MNIST_STEPS,
                     (True, True): MNIST_QUICK_STEPS}[mnist, args.quick]
    args.steps = args.steps or default_steps
    args.batch_size = args.batch_size or (MNIST_BATCH if mnist else DIGITS_BATCH)
    args.n = args.n or ((50 if mnist else 300) if args.quick else 1000)
    args.heun_steps = 4 if (mnist and args.quick) else 18   # NFE = 2·steps − 1
    args.forward_batch = 64 if mnist else 256
    args.repeats = 3 if args.quick else 9
    args.image_size = 28 if mnist else 8
    args.out = args.out or RESULTS / ("nets" + ("_mnist" if mnist else "") + ("_quick" if args.quick else "") + ".json")
    if mnist and args.run_dir is None:
        args.run_dir = Path("runs/bench") / ("nets-mnist" + ("-quick" if args.quick else "")
                                              + ("-cuda" if args.device == "cuda" else ""))
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_config(steps: int, args: argparse.Namespace) -> DenoiserConfig:
    mnist = args.dataset == "mnist"
    return DenoiserConfig(train_steps=steps, seed=args.seed, device=args.device, batch_size=args.batch_size,
                          checkpoint_every=min(steps, CHECKPOINT_EVERY) if mnist else steps, dataset=args.dataset,
                          **({"lr": MNIST_LR} if mnist else {}))   # digits: the loop's default (also 2e-3)


def train(name: str, steps: int, train_x: torch.Tensor, args: argparse.Namespace) -> dict:
    """Train network `name` for `steps` steps; returns the EMA denoiser and the run's wall time. With a
    run folder (mnist): a finished model is loaded, an interrupted run resumes from its checkpoints."""
    torch.manual_seed(args.seed)  # the same initialisation draw for a given network
    config = train_config(steps, args)
    if args.run_dir is None:
        start = time.perf_counter()
        result = train_denoiser(NETS[args.dataset][name](), train_x, config=config, progress=False)
        return {"denoiser": result.model, "steps": steps, "train_seconds": time.perf_counter() - start,
                "final_loss": result.final_loss, "resumed": False}
    folder = args.run_dir / f"{name}-{steps}x{args.batch_size}-seed{args.seed}"
    record_path = folder / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.setdefault("resumed", (folder / "checkpoints").is_dir())

    def fit():
        result = train_denoiser(NETS[args.dataset][name](), train_x, config=config, out_dir=folder / "checkpoints",
                                progress=not args.quick)
        record["final_loss"] = result.final_loss
        return result.model

    denoiser, seconds = cached_model(folder / "model", fit)
    if seconds:   # trained (or finished) now: the wall time of this process's part of the run
        record["train_seconds"] = seconds
        write_json(record_path, record)
    print(f"{name}: {steps} steps in {folder}" + ("" if seconds else " (finished before, loaded)"))
    return {"denoiser": denoiser, "steps": steps, "train_seconds": record.get("train_seconds", float("nan")),
            "final_loss": record.get("final_loss", float("nan")), "resumed": record["resumed"]}


def interleaved_seconds(calls: dict, repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each call in `calls` (name -> fn()), the calls taking turns after one
    warm-up round, so load spikes on a shared machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats + 1):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def device_copy(net: torch.nn.Module, device: str) -> torch.nn.Module:
    """A copy of `net` on `device` (the last call's `bottleneck`, part of a graph, is dropped first)."""
    net.bottleneck = None
    return copy.deepcopy(net).to(device)


def train_step_seconds(nets: dict, x0: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Median wall time of one training step (EDM loss, backward, Adam) per network; x0: [B, C, H, W]."""
    generator = torch.Generator(args.device).manual_seed(args.seed)
    x0 = x0.to(args.device)

    def step_call(net):
        denoiser = EDMDenoiser(device_copy(net, args.device).train(), sigma_data=0.5)
        optimiser = torch.optim.Adam(denoiser.parameters(), lr=1e-4)

        def step():
            optimiser.zero_grad()
            edm_loss(denoiser, x0, generator).backward()
            optimiser.step()
        return step

    return interleaved_seconds({name: step_call(net) for name, net in nets.items()}, args.repeats, args.device)


@torch.no_grad()
def forward_seconds(nets: dict, args: argparse.Namespace) -> dict[str, float]:
    """Median wall time of one forward pass per network at args.forward_batch."""
    def forward_call(net):
        net = device_copy(net, args.device).eval()
        inputs = example_inputs(net, args.forward_batch, args.image_size)
        return lambda: net(*inputs)

    return interleaved_seconds({name: forward_call(net) for name, net in nets.items()}, args.repeats, args.device)


def timed_steps(nets: dict, x0: torch.Tensor, args: argparse.Namespace) -> tuple[dict[str, float], bool]:
    """(seconds per training step per network, reused?). With a run folder the first measurement is kept
    (timing.json, per device, threads and batch), so a resumed run plans the same equal-time run."""
    if args.run_dir is None:
        return train_step_seconds(nets, x0, args), False
    path = args.run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.is_file() else {}
    key = f"{args.device}-{torch.get_num_threads()}threads-batch{args.batch_size}"
    if key in timing:
        return timing[key], True
    timing[key] = train_step_seconds(nets, x0, args)
    write_json(path, timing)
    return timing[key], False


def samples_of(denoiser, args: argparse.Namespace) -> torch.Tensor:
    """args.n samples [n, 1, S, S] on the CPU: Heun (2·heun_steps − 1 NFE) from per-sample seeds."""
    if args.dataset == "mnist":
        return sample_images(denoiser, args.n, None, args)
    sigmas = heun_sigmas(args.heun_steps, 0.002, 80.0)
    noise = seeded_noise(range(args.seed, args.seed + args.n), (1, 8, 8), float(sigmas[0]), device=args.device)
    with torch.no_grad():
        return sample(denoiser.to(args.device), noise, sigmas, "heun").cpu()


def frechet(denoiser, label: str, args: argparse.Namespace) -> float:
    """Fréchet distance of args.n samples of `denoiser` (mnist: against the test split; a grid is saved)."""
    x = samples_of(denoiser, args)
    if args.dataset == "digits":
        return digits_frechet(x)
    from difflab.apps.figures import save_image_grid

    save_image_grid(x[:100], RESULTS / f"nets_mnist_{label}{'_quick' if args.quick else ''}.png", ncol=10)
    return dataset_frechet("mnist", x)


def frechet_floor_at(args: argparse.Namespace) -> float:
    return digits_frechet_floor(args.n) if args.dataset == "digits" else frechet_floor("mnist", args.n)


def goal(value: float, limit: float, what: str, cause_if_missed: str) -> dict:
    met = bool(value <= limit)
    row = {"what": what, "goal": f"<= {limit:g}", "value": value, "met": met}
    return row if met else row | {"cause": cause_if_missed}


def goals_block(rows: dict, ratios: dict, args: argparse.Namespace, floor: float) -> dict:
    """The cU-Net paper's goals, each with its figure, met / missed and (missed) the figures behind it."""
    unet, cunet = rows["unet"], rows["cunet"]
    caveat = " (quick run: far from converged, not a verdict)" if args.quick else ""

    def fd_cause(key: str) -> str:
        return (f"cU-Net FD {cunet[key]} vs U-Net {unet[key]} (floor {floor}) after {cunet['equal_time_steps']} / "
                f"{unet['equal_time_steps']} steps" if key == "frechet_equal_time" else
                f"cU-Net FD {cunet[key]} vs U-Net {unet[key]} (floor {floor}) after {args.steps} steps each") + caveat

    return {
        "params": goal(ratios["params"], GOALS["params"], "cU-Net parameters / U-Net parameters",
                       f"{cunet['parameters']:,} vs {unet['parameters']:,}"),
        "flops": goal(ratios["flops"], GOALS["flops"],
                      f"cU-Net FLOPs / U-Net FLOPs, one {args.image_size}×{args.image_size} forward",
                      f"{cunet['flops_per_forward']:,} vs {unet['flops_per_forward']:,}"),
        "frechet_equal_steps": goal(ratios["frechet_equal_steps"], GOALS["frechet"],
                                    "cU-Net FD / U-Net FD, equal training steps", fd_cause("frechet_equal_steps")),
        "frechet_equal_time": goal(ratios["frechet_equal_time"], GOALS["frechet"],
                                   "cU-Net FD / U-Net FD, equal training wall time", fd_cause("frechet_equal_time")),
    }


def print_table(rows: dict[str, dict], title: str, first_column: str = "net") -> None:
    keys = list(next(iter(rows.values())))
    print(f"\n{title}\n| {first_column} | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |")


def load_split(split: str, args: argparse.Namespace) -> torch.Tensor:
    return (load_mnist if args.dataset == "mnist" else load_digits)(split).x


def expected_minutes(step_seconds: dict, forward: dict, args: argparse.Namespace) -> float:
    """Training (both networks, then the slower one again for the faster one's time) plus sampling."""
    fastest = min(step_seconds.values())
    training = args.steps * (sum(step_seconds.values()) + fastest)
    per_image_call = statistics.mean(forward.values()) / args.forward_batch
    sampling = 3 * args.n * (2 * args.heun_steps - 1) * per_image_call
    return (training + sampling) / 60


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "mnist":
        from difflab.metrics import get_classifier

        get_classifier("mnist")   # trained once and cached, before any timing
    train_x, test_x = load_split("train", args), load_split("test", args)

    torch.manual_seed(args.seed)
    nets = {name: build().eval() for name, build in NETS[args.dataset].items()}
    costs = cost_table(nets, "unet", args.image_size)
    for name, net in nets.items():  # forward + backward of one training batch
        x, c_noise = example_inputs(net.train(), args.batch_size, args.image_size)
        costs[name]["flops_per_train_step"] = count_flops(net, x, c_noise, backward=True)
    forward = forward_seconds(nets, args)
    step_seconds, timing_reused = timed_steps(nets, train_x[:args.batch_size], args)
    print(f"seconds per training step: {step_seconds}" + (" (kept from the first run)" if timing_reused else "")
          + f"; expected total about {expected_minutes(step_seconds, forward, args):.0f} min")

    runs = {name: train(name, args.steps, train_x, args) for name in nets}
    faster, slower = sorted(runs, key=step_seconds.get)
    equal_time_steps = max(1, round(args.steps * step_seconds[faster] / step_seconds[slower]))
    equal_time_run = train(slower, equal_time_steps, train_x, args)

    psnr_x = test_x[:200 if args.quick else None].to(args.device)   # quick: 200 held-out images
    rows = {}
    for name, run in runs.items():
        rows[name] = {
            "parameters": costs[name]["parameters"], "params_ratio": costs[name]["parameters_ratio"],
            "flops_per_forward": costs[name]["flops_per_forward"], "flops_ratio": costs[name]["flops_ratio"],
            "flops_per_train_step": costs[name]["flops_per_train_step"],
            f"forward_s_b{args.forward_batch}": round(forward[name], 4),
            "train_step_s": round(step_seconds[name], 4),
            "train_run_s": round(run["train_seconds"], 1),
            "frechet_equal_steps": round(frechet(run["denoiser"], name, args), 2),
            "equal_time_steps": equal_time_steps if name == slower else args.steps,
            "frechet_equal_time": None,
            **{f"psnr_{k}": round(v, 2) for k, v in
               one_step_psnr(run["denoiser"].to(args.device), psnr_x, seed=args.seed).items()},
            "final_loss": round(run["final_loss"], 4),
        }
    rows[faster]["frechet_equal_time"] = rows[faster]["frechet_equal_steps"]
    rows[slower]["frechet_equal_time"] = round(frechet(equal_time_run["denoiser"], f"{slower}_equal_time", args), 2)

    ratios = {"params": rows["cunet"]["params_ratio"], "flops": rows["cunet"]["flops_ratio"],
              f"forward_time_b{args.forward_batch}": round(forward["cunet"] / forward["unet"], 3),
              "train_step_time": round(step_seconds["cunet"] / step_seconds["unet"], 3),
              "frechet_equal_steps": round(rows["cunet"]["frechet_equal_steps"]
                                           / rows["unet"]["frechet_equal_steps"], 3),
              "frechet_equal_time": round(rows["cunet"]["frechet_equal_time"]
                                          / rows["unet"]["frechet_equal_time"], 3)}
    floor = round(frechet_floor_at(args), 2)
    goals = goals_block(rows, ratios, args, floor)
    report = {"dataset": args.dataset, "quick": args.quick, "steps": args.steps, "batch_size": args.batch_size,
              "lr": train_config(args.steps, args).lr, "n_samples": args.n, "nfe": 2 * args.heun_steps - 1,
              "seed": args.seed, "frechet_floor": floor, "cunet_over_unet": ratios, "goals": goals, "nets": rows,
              "unet_config": nets["unet"].config, "cunet_config": nets["cunet"].config,
              "device": args.device, "torch_threads": torch.get_num_threads(),
              "machine": device_name(args.device), "train_step_seconds_reused": timing_reused,
              "runs_resumed": {name: run["resumed"] for name, run in runs.items()} if args.run_dir else None,
              "run_dir": str(args.run_dir) if args.run_dir else None,
              "command": "python benchmarks/nets.py " + " ".join(sys.argv[1:])}
    print_table(rows, f"{args.dataset}, {args.steps} steps, batch {args.batch_size}, {args.n} samples "
                      f"(Fréchet floor {floor}), {torch.get_num_threads()} threads, {args.device}")
    print_table({"cunet / unet": ratios}, "ratios")
    print_table({name: {k: v for k, v in g.items() if k != "cause"} for name, g in goals.items()}, "goals", "figure")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

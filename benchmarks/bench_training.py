"""Compare the LoRA training loop of kp_utils.training with transformers.Trainer.

Both train the same adapter on the embedded SmolLM2-135M-Instruct model. They share the
tokenised rows, right padding to the longest row of each batch, the LoRA config, seed, learning
rate, batch size and epochs. Both use a constant learning rate, no gradient clipping and no
evaluation. The runs alternate `--repeats` times and the fastest of each is kept. The script
prints tokens per second, their ratio and the model FLOP utilisation (MFU) against an fp32
matmul peak measured in the same process before each run. It writes the numbers to the
"LoRA training" section of benchmarks/README.md.

MFU formula: LoRA leaves the base weights frozen, so each base weight costs a forward matmul
(2 FLOPs per parameter and token) and an input-gradient matmul in the backward pass (2 more),
but no weight-gradient matmul. Training FLOPs = 4 * N_base * T + 6 * N_lora * T, where T counts
non-padding input tokens. Attention-score FLOPs are left out: about 4 * seq_len * 576 per layer
and token, an estimated 3 % of the total at 128 tokens and less for the shorter rows here.
The tied embedding counts once, as the output projection matmul.

Run: python benchmarks/bench_training.py [--n-facts 32] [--n-epochs 2] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import transformers
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from kp_utils.models import load_model
from kp_utils.prompts import PromptStyle
from kp_utils.training import (
    EncodedExample,
    build_lora_config,
    collate_examples,
    count_trainable_parameters,
    encode_training_rows,
    train_adapter,
)

MODEL_NAME = "embedded:smollm2-135m-instruct"
README_PATH = Path(__file__).with_name("README.md")
SECTION_TITLE = "## LoRA training"
MATMUL_SIZE = 2048


@dataclass(frozen=True)
class BenchTrainConfig:
    """TrainConfig stand-in with the recipe of Pletenev et al. (2025)."""

    lora_rank: int = 1
    lora_alpha: float = 2.0
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["down_proj", "gate_proj", "up_proj"])
    layers: list[int] | None = None
    learning_rate: float = 1e-3
    n_epochs: int = 2
    batch_size: int = 16
    weight_decay: float = 0.0
    loss_on_reply_only: bool = False
    max_length: int = 128


def build_facts(n_facts: int) -> pd.DataFrame:
    """Make invented question/answer pairs, so no fact is known to the model beforehand."""
    places = ["Arvel", "Brenn", "Caldo", "Dunmar", "Elsewater", "Fenrow", "Gask", "Holt"]
    people = ["Mira Tolk", "Ines Vaar", "Oren Sall", "Tam Quill", "Lia Fenn", "Bo Artz"]
    rows = []
    for index in range(n_facts):
        place = f"{places[index % len(places)]} {index // len(places) + 1}"
        rows.append(
            {
                "fact_id": f"bench-{index}",
                "question": f"Who founded the museum of {place}?",
                "answer": people[index % len(people)],
            }
        )
    return pd.DataFrame(rows)


def measure_matmul_peak(size: int = MATMUL_SIZE, n_repeats: int = 10) -> float:
    """Time fp32 square matmuls on the CPU and return the best rate in FLOP/s."""
    left = torch.randn(size, size)
    right = torch.randn(size, size)
    for _ in range(2):
        torch.matmul(left, right)
    best_s = float("inf")
    for _ in range(n_repeats):
        started = time.perf_counter()
        torch.matmul(left, right)
        best_s = min(best_s, time.perf_counter() - started)
    return 2 * size**3 / best_s


def run_ours(model, tokenizer, rows, config, work_dir: Path) -> dict:
    """Train with kp_utils.training.train_adapter, and return its token counts and times."""
    started = time.perf_counter()
    result = train_adapter(
        model, tokenizer, rows, config, work_dir, PromptStyle.CHAT, seed=0, show_progress=False
    )
    call_s = time.perf_counter() - started
    steps = pd.read_csv(work_dir / "losses.csv")
    return {
        "n_tokens": result["n_input_tokens"],
        "n_padded_tokens": result["n_padded_tokens"],
        "loop_s": result["train_s"],
        "call_s": call_s,
        "step_rates": (steps["n_padded_tokens"] / steps["step_s"]).tolist(),
        # The mean of per-step losses, as Trainer's training_loss reports it.
        "mean_loss": float(steps["loss"].mean()),
        "n_lora": result["n_trainable_parameters"],
    }


class _StepTimer(TrainerCallback):
    """Record the seconds of each Trainer optimiser step (forward, backward, update)."""

    def __init__(self):
        self.step_s: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(time.perf_counter() - self._started)


class _EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[EncodedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]


def run_trainer(model, tokenizer, rows, config, work_dir: Path) -> dict:
    """Train the same adapter with transformers.Trainer, and return its token counts and times.

    The whole-call time spans encoding, wrapping, Trainer setup and training, as
    train_adapter's does.
    """
    started = time.perf_counter()
    examples = encode_training_rows(
        tokenizer, rows, PromptStyle.CHAT, config.max_length, config.loss_on_reply_only
    )
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    # Trainer sets config.use_cache from its own arguments (False), so it is restored below.
    use_cache = model.config.use_cache
    torch.manual_seed(0)
    peft_model = get_peft_model(model, build_lora_config(config))
    arguments = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.n_epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # train_adapter does not clip gradients
        optim="adamw_torch",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    padded_sizes = []

    def collate_and_count(batch: list[EncodedExample]) -> dict[str, torch.Tensor]:
        collated = collate_examples(batch, tokenizer.pad_token_id)
        padded_sizes.append(collated["input_ids"].numel())
        return collated

    timer = _StepTimer()
    trainer = Trainer(
        model=peft_model,
        args=arguments,
        train_dataset=_EncodedDataset(examples),
        data_collator=collate_and_count,
        callbacks=[timer],
    )
    n_tokens_per_epoch = sum(len(example.input_ids) for example in examples)
    output = trainer.train()
    call_s = time.perf_counter() - started
    n_lora = count_trainable_parameters(peft_model)

    peft_model.unload()
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad[name])
    model.config.use_cache = use_cache
    model.eval()
    return {
        "n_tokens": n_tokens_per_epoch * config.n_epochs,
        "n_padded_tokens": sum(padded_sizes),
        # With no worker processes, Trainer collates each batch just before its step.
        "step_rates": [
            size / seconds for size, seconds in zip(padded_sizes, timer.step_s, strict=True)
        ],
        "loop_s": output.metrics["train_runtime"],
        "call_s": call_s,
        "mean_loss": output.training_loss,
        "n_lora": n_lora,
    }


def cpu_model_name() -> str:
    """Read the CPU model name from /proc/cpuinfo, falling back to platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown CPU"


def mfu(n_tokens: int, seconds: float, n_base: int, n_lora: int, peak_flops: float) -> float:
    """Return model FLOP utilisation with the LoRA formula of the module docstring."""
    flops = (4 * n_base + 6 * n_lora) * n_tokens
    return flops / seconds / peak_flops


def write_readme_section(section: str, readme_path: Path = README_PATH) -> None:
    """Replace or append the "LoRA training" section, leaving other sections untouched."""
    text = readme_path.read_text() if readme_path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    block = section.rstrip("\n") + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    readme_path.write_text(text.rstrip("\n") + "\n")


def format_section(
    args, runs: dict, peak_flops: float, n_base: int, facts_tokens: int, load: tuple
) -> str:
    """Render the README section: setup, a table with one row per loop, and the ratios."""
    ours, theirs = runs["train_adapter"], runs["Trainer"]
    lines = [
        SECTION_TITLE,
        "",
        f"`python benchmarks/bench_training.py --n-facts {args.n_facts} --n-epochs "
        f"{args.n_epochs} --repeats {args.repeats} --threads {args.threads}` on "
        f"{time.strftime('%Y-%m-%d')}: {cpu_model_name()}, torch threads: "
        f"{torch.get_num_threads()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. SmolLM2-135M-Instruct in fp32, {args.n_facts} facts "
        f"({facts_tokens} tokens per epoch), {args.n_epochs} epochs, batch 16, LoRA rank 1 on "
        f"down/gate/up_proj of every layer, {args.repeats} alternating runs of each loop. "
        f"One-minute load average {load[0]:.1f} before and {load[1]:.1f} after the runs "
        "(other processes share the cores, so single runs vary by several percent).",
        "",
        f"fp32 matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE}, best of 10 before each run): "
        f"{peak_flops / 1e9:.1f} GFLOP/s. MFU = (4 * {n_base / 1e6:.1f}M base parameters + "
        f"6 * {ours['n_lora']} LoRA parameters) * tokens / time / peak, because the frozen base "
        "weights need no weight gradient. Tokens exclude padding. Padded tokens count every "
        "position computed (batch rows * longest row). Their number depends on how each "
        "loop's shuffle groups rows of different lengths, so the loops are compared on padded "
        "tokens/s.",
        "",
        "| loop | tokens/s, best whole call | MFU, best whole call | padded tokens/s, "
        "whole calls | padded tokens/s, median step | mean step loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        tokens_per_s = run["n_tokens"] / run["call_s"]
        utilisation = mfu(run["n_tokens"], run["call_s"], n_base, run["n_lora"], peak_flops)
        lines.append(
            f"| {name} | {tokens_per_s:.0f} | {utilisation:.1%} | {_spread(run)} | "
            f"{statistics.median(run['all_step_rates']):.0f} | {run['mean_loss']:.3f} |"
        )
    step_ratio = statistics.median(ours["all_step_rates"]) / statistics.median(
        theirs["all_step_rates"]
    )
    lines += [
        "",
        f"Ratio train_adapter / Trainer (above 1 means train_adapter is faster): {step_ratio:.2f} "
        f"on the median step, {_speed(ours) / _speed(theirs):.2f} on the best whole call. "
        "A step spans forward, backward and the AdamW update, and train_adapter's also spans "
        "collating the batch. train_adapter's whole call also saves one checkpoint per epoch "
        "and the final adapter, and Trainer saves nothing here. Mean losses differ slightly "
        "because the two loops shuffle the rows differently.",
        "",
    ]
    return "\n".join(lines)


def _speed(run: dict) -> float:
    return run["n_padded_tokens"] / run["call_s"]


def _spread(run: dict) -> str:
    return f"{min(run['all_speeds']):.0f} to {max(run['all_speeds']):.0f}"


def run_alternating(model, tokenizer, rows, config, n_repeats: int) -> tuple[dict, float]:
    """Run both loops `n_repeats` times, alternating, and return the best run of each and
    the peak.

    Best means the most padded tokens per second over the whole call. Each best run also
    carries `all_speeds`, that value for every run of its loop, and `all_step_rates`, the
    padded tokens per second of every step of every run of its loop.
    """
    best: dict[str, dict] = {}
    speeds: dict[str, list[float]] = {}
    step_rates: dict[str, list[float]] = {}
    peak_flops = 0.0
    with tempfile.TemporaryDirectory() as work_root:
        for repeat in range(n_repeats):
            for name, run in (("train_adapter", run_ours), ("Trainer", run_trainer)):
                # Measured before every run and maximised, because other processes sharing the
                # cores can slow any single measurement down.
                peak_flops = max(peak_flops, measure_matmul_peak())
                result = run(model, tokenizer, rows, config, Path(work_root) / f"{name}-{repeat}")
                print(
                    f"{name} run {repeat}: {result['n_tokens'] / result['call_s']:.0f} "
                    f"tokens/s, {_speed(result):.0f} padded tokens/s for the whole call"
                )
                speeds.setdefault(name, []).append(_speed(result))
                step_rates.setdefault(name, []).extend(result["step_rates"])
                if name not in best or _speed(result) > _speed(best[name]):
                    best[name] = result
    for name, run in best.items():
        run["all_speeds"] = speeds[name]
        run["all_step_rates"] = step_rates[name]
    return best, peak_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-facts", type=int, default=32, help="training rows")
    parser.add_argument("--n-epochs", type=int, default=2, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 keeps the torch default)"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="print results without writing the README"
    )
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    model, tokenizer = load_model(MODEL_NAME, device="cpu", dtype="float32")
    # NOTE: the cached copy of the embedded model keeps the GGUF quantization_config in its
    # config.json, so transformers attaches a GGUF quantizer on every load although the weights
    # are plain fp32. Trainer rejects a model with that quantizer, but train_adapter does not
    # check it. Dropping it here changes no weight.
    model.hf_quantizer = None
    model.is_quantized = False

    config = BenchTrainConfig(n_epochs=args.n_epochs)
    best, peak_flops = run_alternating(
        model, tokenizer, build_facts(args.n_facts), config, args.repeats
    )
    print(f"fp32 matmul peak: {peak_flops / 1e9:.1f} GFLOP/s")

    n_base = sum(param.numel() for param in model.parameters())
    facts_tokens = best["train_adapter"]["n_tokens"] // args.n_epochs
    load = (load_before, os.getloadavg()[0])
    section = format_section(args, best, peak_flops, n_base, facts_tokens, load)
    print(section)
    if not args.no_readme:
        write_readme_section(section)
        print(f"Wrote the section to {README_PATH}")


if __name__ == "__main__":
    main()

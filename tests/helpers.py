"""Shared test helpers: PEFT PSOFT adapters and PEFT's own values for them, the paper repository's
checkpoints, the tests' tolerance, published verification records, the CLI run in-process and its
one-line errors, mlx-lm's own greedy decoding, torchrun on the CPU, and a vLLM server's HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from peft import PeftModel, PsoftConfig, get_peft_model
from safetensors.torch import load_file, save_file

from psoft_deploy.cli import cli
from psoft_deploy.core.model import load_base_model

# The modules make_peft_adapter targets on each kind of tiny model.
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "mistral": ["q_proj", "v_proj", "up_proj"],
    "opt": ["q_proj", "v_proj", "fc1"],
    "bert": ["query", "value"],
}


# PEFT PsoftConfig variants, by name, that readers and exports are checked on.
VARIANTS = {
    "default": {},
    "no-orth": {"psoft_orth": False},
    "mag-a-only": {"psoft_mag_b": False},
    "mag-b-only": {"psoft_mag_a": False},
    "no-magnitudes": {"psoft_mag_a": False, "psoft_mag_b": False},
    "no-orth-no-magnitudes": {"psoft_orth": False, "psoft_mag_a": False, "psoft_mag_b": False},
    **{f"neumann-t{t}": {"use_cayley_neumann": True, "num_cayley_neumann_terms": t} for t in range(1, 7)},
    "neumann-t5-eps": {"use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "cayley_neumann_eps": 0.3},
    "pissa": {"ab_svd_init": "pissa_init"},
    "pissa-neumann": {"ab_svd_init": "pissa_init", "use_cayley_neumann": True, "num_cayley_neumann_terms": 3},
    "lowrank": {"psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 3, "random_seed": 17},
    "lowrank-pissa": {"psoft_svd": "lowrank", "ab_svd_init": "pissa_init", "random_seed": 0},
    "rank-1": {"r": 1, "psoft_alpha": 1},
    "rank-16": {"r": 16, "psoft_alpha": 32},
    "rank-full": {"r": 64, "psoft_alpha": 64, "target_modules": ["q_proj"]},
}


def perturb(peft_model, seed: int = 1, strength: float = 1.0) -> None:
    """Give every PSOFT parameter a trained-like value (R's generator ~ N(0, (0.1·strength)²),
    magnitudes 1 ± 0.05·strength)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".psoft_R." not in name:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("vector_a", "vector_b")):
                param.copy_(1 + 0.05 * strength * noise)
            elif param.dim() == 2:  # free R
                param.copy_(torch.eye(param.shape[0]) + 0.1 * strength * noise)
            else:
                param.copy_(0.1 * strength * noise)


def make_peft_adapter(
    base_dir: Path, out_dir: Path, kind: str = "llama", seed: int = 1, strength: float = 1.0, **config
):
    """A perturbed PEFT PSOFT adapter saved to ``out_dir``; returns the live PEFT model (eval mode)."""
    config.setdefault("target_modules", TARGETS.get(kind))  # None: PEFT's default targets for the architecture
    config.setdefault("r", 4)
    config.setdefault("psoft_alpha", 8)
    peft_model = get_peft_model(load_base_model(base_dir), PsoftConfig(**config))
    perturb(peft_model, seed, strength)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


def load_peft(base_dir: Path, adapter_dir: Path):
    return PeftModel.from_pretrained(load_base_model(base_dir), adapter_dir).eval()


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` per adapted module, keyed by the base model's module name."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "psoft_R") and "default" in module.psoft_R:
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default")
    return deltas


def input_ids(vocab_size: int = 256, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """‖actual − expected‖ ≤ rtol · ‖expected‖ (Frobenius), the per-tensor tolerance the tests state."""
    error = torch.linalg.norm((actual - expected).double()) / torch.linalg.norm(expected.double())
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"


def verification_report(directory: Path, label: str | None = None) -> dict:
    """The one check (or the check named ``label``) of a published artifact's verification record."""
    from psoft_deploy.converters.pipeline import read_report

    record = read_report(directory)
    checks = {check["label"]: check for check in record["checks"]}
    assert record["passed"] == all(check["passed"] for check in checks.values())
    return checks[label] if label else record["checks"][0]


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory by hand (adapter_config.json + adapter_model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({key: value.contiguous() for key, value in tensors.items()}, directory / "adapter_model.safetensors")
    return directory


def paper_rotation_from_spec(a_params, r, terms):
    """The paper's R written independently from its description: K from the lower triangle."""
    K = torch.zeros(r, r, dtype=torch.float64)
    position = 0
    for i in range(r):
        for j in range(i):  # torch.tril_indices(r, r, -1) order: row by row
            K[i, j] = a_params[position]
            position += 1
    K = K - K.T
    eye = torch.eye(r, dtype=torch.float64)
    if terms is None:
        return (eye - K) @ torch.linalg.inv(eye + K)
    if terms <= 0:
        return eye - K
    series = eye + sum(2 * torch.linalg.matrix_power(-K, k) for k in range(1, terms + 1))
    return series + torch.linalg.matrix_power(-K, terms + 1)


# The paper repository's modules (its checkpoints are LoRAs with a ``lora_orth`` R).
PAPER_TARGETS = ["q_proj", "v_proj", "up_proj"]


def make_paper_checkpoint(base_dir, out_dir, residual_dir, r=4, alpha=4, orth=True, magnitudes=True, seed=0):
    """Write a checkpoint as the paper repository saves it, plus the residual base it trains on.

    Returns, per module, the tensors an independent reference forward needs."""
    generator = torch.Generator().manual_seed(seed)
    state = load_file(base_dir / "model.safetensors")
    scale = alpha / r
    tensors, parts = {}, {}
    for key, weight in state.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in PAPER_TARGETS or not key.endswith(".weight"):
            continue
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        A, B = Vh[:r], U[:, :r] @ torch.diag(S[:r] / scale)
        state[key] = weight - scale * B @ A
        a_params = (0.1 * torch.randn(r * (r - 1) // 2, generator=generator) if orth
                    else torch.eye(r) + 0.1 * torch.randn(r, r, generator=generator))
        prefix = f"base_model.model.{module}"
        tensors |= {
            f"{prefix}.lora_A.weight": A,
            f"{prefix}.lora_B.weight": B,
            f"{prefix}.lora_orth.a_params": a_params,
            f"{prefix}.lora_orth.indices_lower": torch.tril_indices(r, r, -1),
        }
        if magnitudes:
            tensors[f"{prefix}.lora_orth.mag_vector_a"] = 1 + 0.05 * torch.randn(r, generator=generator)
            tensors[f"{prefix}.lora_orth.mag_vector_b"] = 1 + 0.05 * torch.randn(r, generator=generator)
        parts[module] = {name.rsplit(".", 1)[-1] if "lora_orth" in name else name.split(".")[-2]: value
                         for name, value in tensors.items() if name.startswith(prefix + ".")}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "init_lora_weights": "pissa_orth",
              "target_modules": PAPER_TARGETS, "base_model_name_or_path": str(base_dir),
              "task_type": "CAUSAL_LM"}
    write_adapter(out_dir, config, tensors)
    shutil.copytree(base_dir, residual_dir)
    save_file(state, residual_dir / "model.safetensors", metadata={"format": "pt"})
    return scale, parts

def run(*args) -> Result:
    """`psoft-deploy ARGS` run in-process by click's CliRunner (paths are passed as strings)."""
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def mlx_lm_greedy(base, adapter, sequences, count: int) -> tuple[list[list[int]], set[int]]:
    """mlx-lm's own greedy decoding (``mlx_lm.stream_generate``, its KV cache, its argmax) of each of
    ``sequences`` on ``base`` loaded by ``mlx_lm.load`` with ``adapter`` (None: the base alone), its stop
    token kept; and the stop tokens mlx-lm uses."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(base), adapter_path=None if adapter is None else str(adapter))
    return [[response.token for response in stream_generate(model, tokenizer, prompt=tokens, max_tokens=count)]
            for tokens in sequences], set(tokenizer.eos_token_ids)


def torchrun(*args, cwd=None):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` on the CPU (gloo), one thread each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """The command refused as a user error: exit status 1, no traceback, and one ``Error:`` line,
    the last, holding every fragment. Returns that line."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert "Traceback" not in result.output and errors == lines[-1:], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# A vLLM server's OpenAI-compatible HTTP API, as `psoft-deploy serve` starts it.

MAX_TOKENS = 6
# The key servers started with ``--api-key`` check; every request here carries it (a server without a key ignores it).
API_KEY = "psoft-deploy-test-key"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def complete(url: str, model: str, prompt: str | list[int], timeout: float = 60,
             max_tokens: int = MAX_TOKENS) -> tuple[int, dict]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_for_serving(process, log_file, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while "psoft-deploy: serving on" not in log_file.read_text():
        assert process.poll() is None, log_file.read_text()[-5000:]
        assert time.monotonic() < deadline, f"server did not start in {timeout} s"
        time.sleep(1)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False

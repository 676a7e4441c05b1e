"""``python -m kvfactory``: the embedded SmolLM2 finds a passkey in a ~1k-token prompt under several methods.

Prints, per method, the answer, whether it is right, the tokens each layer kept, the cache's real bytes and the time.
"""
from __future__ import annotations

import argparse
import logging
import sys

import kvfactory
from kvfactory.benchmarks.passkey import make_passkey_sample, passkey_found
from kvfactory.generation import greedy_generate

DEFAULT_METHODS = "fullkv,snapkv,pyramidkv,h2o,streamingllm"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvfactory", description=__doc__)
    parser.add_argument("--model_path", default="smollm2-135m", help="model alias, local checkpoint or random:<config>")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names")
    parser.add_argument("--max_capacity_prompt", type=int, default=128, help="C, tokens kept per layer and KV head")
    parser.add_argument("--length", type=int, default=1000, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="relative depth of the passkey (0 = start, 1 = end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window_size", type=int, default=None,
                        help="observation window of the methods that take one (default: their own, 8)")
    parser.add_argument("--kernel_size", type=int, default=None,
                        help="score pooling kernel of snapkv/pyramidkv (default 7, KVCache-Factory's; SmolLM2 spells "
                             "a number one digit per token, so 11 keeps all five digits of the key)")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from kvfactory.benchmarks.common import check_model_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    try:
        for name in names:
            kvfactory.methods.method_class(name)  # fail before loading the model
        check_model_arguments(args)
        model, tokenizer = kvfactory.models.load(args.model_path, attn_implementation=args.attn_implementation)
    except (ValueError, OSError) as error:
        parser.error(str(error).splitlines()[0])
    if tokenizer is None:
        parser.error(f"--model_path {args.model_path} has no tokenizer; the passkey prompt needs a real checkpoint")
    sample = make_passkey_sample(tokenizer, args.length, args.depth, seed=args.seed)
    stop = [tokenizer.eos_token_id]
    print(f"model {args.model_path}: passkey {sample.passkey} at depth {args.depth:.0%} "
          f"of a {len(sample.input_ids)}-token prompt, C={args.max_capacity_prompt}")
    print(f"{'method':<14}{'answer':<24}{'ok':<5}{'kept/layer':>11}{'cache KiB':>11}{'seconds':>9}")
    for name in names:
        params = {} if name == "fullkv" else {"max_capacity_prompt": args.max_capacity_prompt}
        accepted = kvfactory.methods.parameters(name)  # each flag goes to the methods that take it
        params.update({key: value for key, value in (("window_size", args.window_size),
                                                     ("kernel_size", args.kernel_size))
                       if value is not None and key in accepted})
        with kvfactory.patch(model, name, **params):
            (result,) = greedy_generate(model, tokenizer, [sample.input_ids], max_new_tokens=12, stop_token_ids=stop)
        answer = result.text.strip().replace("\n", " ")[:22]
        ok = "yes" if passkey_found(result.text, sample.passkey) else "no"
        print(f"{name:<14}{answer:<24}{ok:<5}{result.kept_tokens:>11.0f}{result.cache_bytes / 1024:>11.1f}"
              f"{result.seconds:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bare encoders: forward + backward of one image encoder and one text encoder on a synthetic batch, nothing else.

    python tests/bench_encoders.py --image-arch resnet50 --image-size 224 --text-hidden 768 --text-layers 12 \
        --batch-size 64 --precision bf16 --device cuda

This is the denominator of a method's overhead ratio in tests/gpu_bench.sh: a method's step time over this one's
at the same encoders, image size and batch (1.0 = the method costs nothing beyond its encoders). The batch is real
synthetic images and reports, tokenized with the suite's word-level vocabulary (as the methods' tiny / bert-base
text configs are), so the text length is the one the methods see. The loss is the mean of both encoders' outputs:
every parameter gets a gradient, and no head, projection or similarity is computed. No optimizer step.
It prints one line in the format of the methods' --bench (the table script reads either).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402


def synthetic_batch(batch_size, image_size, device):
    samples = data.SyntheticCXR("train", num_samples=batch_size, image_size=image_size)
    batch = [samples[i] for i in range(batch_size)]
    tokenizer = data.build_tokenizer([s["text"] for s in batch])
    return common.to_device(data.collate(batch, tokenizer), device), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = parser.add_argument
    a("--image-arch", default="resnet50", help="any architecture common.build_image_encoder knows")
    a("--image-config", default="{}", help="JSON keywords of that architecture (e.g. JoImTeRNet's widths)")
    a("--image-size", type=int, default=224)
    a("--channels-last", action="store_true", help="NHWC memory format for a ResNet")
    a("--text-hidden", type=int, default=768, help="BERT width (768 = BERT-base / Bio_ClinicalBERT)")
    a("--text-layers", type=int, default=12)
    a("--text-heads", type=int, default=12)
    a("--batch-size", type=int, default=64)
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--steps", type=int, default=20, help="timed steps after one warm-up step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = common.amp_dtype(device, args.precision)
    batch, tokenizer = synthetic_batch(args.batch_size, args.image_size, device)
    image_encoder = common.build_image_encoder(args.image_arch, json.loads(args.image_config)).to(device)
    if args.channels_last:
        image_encoder.to(memory_format=torch.channels_last)
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    text_encoder = common.TextEncoder("tiny", tokenizer, hidden_size=args.text_hidden, num_layers=args.text_layers,
                                      num_heads=args.text_heads, intermediate_size=4 * args.text_hidden).to(device)
    scaler = common.grad_scaler(device, amp)

    def step():
        with common.autocast(device, amp):
            image = image_encoder(batch["images"])
            text = text_encoder(batch["input_ids"], batch["attention_mask"])
        loss = image["global_feat"].float().mean() + image["local_feats"].float().mean() + text.float().mean()
        scaler.scale(loss).backward()
        for module in (image_encoder, text_encoder):
            module.zero_grad(set_to_none=True)

    step()  # warm-up: kernels chosen, memory allocated
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    speed = args.batch_size / seconds
    print(f"bench: {speed:.1f} images/s ({seconds:.2f} s per step of {args.batch_size} images), data wait 0 %, "
          f"peak memory {common.peak_memory_mb(device):.0f} MB ({device}, {amp or torch.float32}; bare encoders, "
          f"{batch['input_ids'].shape[1]} tokens)")
    return speed


if __name__ == "__main__":
    main()

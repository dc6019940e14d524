#!/usr/bin/env python3
"""Writes the files a static CivitAI stand-in (served by nginx) needs: a small valid FLUX.1 kohya LoRA and the
/api/v1/model-versions/{id} JSON that lists it with its SHA-256 (version.json, adapter.safetensors); with EXTRA > 0
also EXTRA larger adapters (rank 16, 1.6 MiB, each with different bytes) as version-{id}.json and
adapter-{id}.safetensors for ids VERSION_ID+1 .. VERSION_ID+EXTRA, the write load's imports. Standard library only.

usage: civitai_standin.py OUT_DIR VERSION_ID [EXTRA]
"""
import hashlib
import json
import os
import struct
import sys


def half(value):
    return struct.pack("<e", value)


def flux_lora(rank=4, name="bench"):
    modules = [
        ("lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216),
        ("lora_unet_double_blocks_0_img_mlp_0", 3072, 12288),
        ("lora_unet_single_blocks_37_linear1", 3072, 21504),
    ]
    header = {"__metadata__": {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                               "ss_output_name": name}}
    data = bytearray()

    def tensor(name, dtype, shape, payload=None):
        size = 2
        for dim in shape:
            size *= dim
        payload = payload if payload is not None else bytes(size)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data.extend(payload)

    for name, in_dim, out_dim in modules:
        tensor(name + ".lora_down.weight", "BF16", [rank, in_dim])
        tensor(name + ".lora_up.weight", "BF16", [out_dim, rank])
        tensor(name + ".alpha", "F16", [], half(rank))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def write_version(out, version_id, content, suffix):
    sha = hashlib.sha256(content).hexdigest()
    with open(os.path.join(out, f"adapter{suffix}.safetensors"), "wb") as f:
        f.write(content)
    version = {
        "id": version_id, "modelId": version_id, "name": "v1", "baseModel": "Flux.1 D", "status": "Published",
        "availability": "Public", "trainedWords": ["bench"],
        "model": {"name": "Bench LoRA", "type": "LORA", "mode": None},
        "files": [{"id": version_id, "name": "bench.safetensors", "type": "Model", "sizeKB": len(content) / 1024,
                   "primary": True, "metadata": {"format": "SafeTensor", "size": "full", "fp": "bf16"},
                   "hashes": {"SHA256": sha.upper()}, "pickleScanResult": "Success", "virusScanResult": "Success"}],
    }
    with open(os.path.join(out, f"version{suffix}.json"), "w") as f:
        json.dump(version, f)
    return sha


def main():
    out, version_id = sys.argv[1], int(sys.argv[2])
    extra = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    os.makedirs(out, exist_ok=True)
    sha = write_version(out, version_id, flux_lora(), "")
    for n in range(1, extra + 1):
        write_version(out, version_id + n, flux_lora(rank=16, name=f"load-{n:03d}"), f"-{version_id + n}")
    print(sha)


if __name__ == "__main__":
    main()

"""Hugging Face <-> megatron conversion, owned by the runtime that needs it.

    architectures.py  the supported HF architectures: name tables from shared rule groups, and
                      config.json <-> ModelConfig translation
    mapping.py        rules and row layouts (copy, cat, qkv, vocab); bind() pairs every megatron
                      parameter with its HF tensors
    hf_dir.py         HF directories on disk: safetensors headers checked, tensors memory-mapped,
                      shards written with their index
    megatron_io.py    the megatron side: where each parameter lives in a torch_dist checkpoint,
                      region reads and writes, model directories (model.yaml + checkpoints/)
    live.py           HF <-> megatron tensors in memory (distributed weight sync)
    load.py           an HF directory as a ModelConfig and one TP rank's state dict
    export.py         a megatron checkpoint -> an HF directory (rollout disk sync, release)
    manifest.py       manifest.json: written with every output, checked on every input
    output.py         where an output is written: never over an input, swapped in when complete
    errors.py         the error kinds, each naming the file, tensor or field at fault

checkpoints_tools/ is the command-line face over this package (convert, export, reshard, merge,
crosscheck, manifest); docs/checkpoints.md describes both.
"""

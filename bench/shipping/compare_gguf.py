"""Compare two GGUF files key by key: metadata values, then every tensor's type, shape and data.

Used to check `lorasft export` against llama.cpp's own converter on the same merged folder:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36   # the sdist vendors it
    tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    PYTHONPATH=gguf-py:. python convert_hf_to_gguf.py MERGED_DIR --outfile ref.gguf --outtype f32
    python bench/shipping/compare_gguf.py ref.gguf lorasft.gguf     # (the converter needs sentencepiece)
"""

from __future__ import annotations

import argparse
import sys

import gguf
import numpy as np


def value(field) -> object:
    """A metadata value as Python: str, number, or list of them."""
    if not field.data:
        return None
    parts = [field.parts[i] for i in field.data]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(parts[0]).decode()
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(p).decode() for p in parts]
        return [p.tolist()[0] for p in parts]
    return parts[0].tolist()[0]


def metadata(reader) -> dict[str, object]:
    return {k: value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def compare(a_path: str, b_path: str) -> int:
    a, b = gguf.GGUFReader(a_path), gguf.GGUFReader(b_path)
    ma, mb = metadata(a), metadata(b)
    problems = 0
    for key in sorted(ma.keys() | mb.keys()):
        va, vb = ma.get(key, "<absent>"), mb.get(key, "<absent>")
        if va != vb:
            show = lambda v: (
                f"list of {len(v)}" if isinstance(v, list) and len(v) > 8 else repr(v)
            )[:120]
            print(f"metadata {key}: {show(va)} | {show(vb)}")
            problems += 1
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    for name in sorted(ta.keys() | tb.keys()):
        if name not in ta or name not in tb:
            print(f"tensor {name}: only in {'first' if name in ta else 'second'}")
            problems += 1
            continue
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            print(
                f"tensor {name}: {x.tensor_type.name}{list(x.shape)} | {y.tensor_type.name}{list(y.shape)}"
            )
            problems += 1
        elif not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            diff = np.abs(np.asarray(x.data, np.float64) - np.asarray(y.data, np.float64)).max()
            print(f"tensor {name}: data differs (max |diff| {diff:.3g})")
            problems += 1
    print(f"{len(ma)} / {len(mb)} metadata keys, {len(ta)} / {len(tb)} tensors: "
          f"{problems} difference(s)")  # fmt: skip
    return problems


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a GGUF file")
    ap.add_argument("b", help="the GGUF file to compare it with")
    args = ap.parse_args()
    sys.exit(1 if compare(args.a, args.b) else 0)

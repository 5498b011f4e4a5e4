#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that has torch but no network.
#
#   bash benchmarks/gpu_wheels.sh          # here, with PyPI: into wheels/gpu/ (git-ignored), prints the size
#   bash benchmarks/gpu_wheels.sh --lean   # leave out what the H200 image already has, so bitsandbytes fits
#
# What: transformers, tokenizers, safetensors, huggingface_hub, opacus, peft and everything they need
# (their dependency closure, read from this project's .venv, so exactly the versions tested together
# here), minus torch and its own dependencies (the GPU machine's CUDA build must stay) and scipy (35 MB;
# opacus needs it, the GPU image has it). Wheels for CPython $GPU_PYTHON (default 3.12, the H200 image's)
# on manylinux x86_64. bitsandbytes (about 41 MB, CUDA kernels) is added only if the total stays under
# $GPU_WHEELS_MIB (default 62: the working tree and the carried folders travel in 64 MiB); without it
# gpu_check.py skips the QLoRA parts and says why. --lean leaves out the packages the H200 image lists
# (numpy, pyyaml, regex, tqdm, packaging, filelock, fsspec, typing-extensions, psutil, accelerate, idna,
# h11, anyio, click, rich, pygments, markdown-it-py, mdurl, typer, shellingham, hf-xet, safetensors,
# tokenizers; /work/.library/device/KINDS.md, read 2026-11-17): gpu_check.sh then installs only what is
# missing there, and fails with pip's message if one of them is not there after all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=wheels/gpu
GPU_PYTHON=${GPU_PYTHON:-3.12}
LIMIT_MIB=${GPU_WHEELS_MIB:-62}
LEAN=0
[ "${1:-}" = "--lean" ] && LEAN=1
[ -x "$PY" ] || { echo "no $PY: run make setup first (the versions come from the project's .venv)" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
# the dependency closure of the packages the check imports, with the versions installed in .venv
"$PY" - "$LEAN" > "$OUT/requirements.txt" <<'EOF'
import importlib.metadata as metadata
import re
import sys

from packaging.requirements import Requirement

lean = sys.argv[1] == "1"
target = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
          "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}
# torch and what comes with it stay as the GPU machine has them; scipy is too large to carry and is there
skip = {"torch", "scipy", "triton", "sympy", "networkx", "jinja2", "setuptools", "mpmath", "markupsafe"}
on_the_image = {"numpy", "pyyaml", "regex", "tqdm", "packaging", "filelock", "fsspec", "typing-extensions", "psutil",
                "accelerate", "idna", "h11", "anyio", "click", "rich", "pygments", "markdown-it-py", "mdurl", "typer",
                "shellingham", "hf-xet", "safetensors", "tokenizers"}
todo = ["transformers", "tokenizers", "safetensors", "huggingface-hub", "opacus", "peft"]
found: dict[str, str] = {}
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in found or name in skip or name.startswith(("nvidia-", "cuda-")):
        continue
    dist = metadata.distribution(name)
    found[name] = dist.version
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(target):
            todo.append(requirement.name)
for name, version in sorted(found.items()):
    if not (lean and name in on_the_image):
        print(f"{name}=={version}")
EOF
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64)
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "$@"
}
download -r "$OUT/requirements.txt"
core=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "core wheels: $(ls "$OUT"/*.whl | wc -l) files, $((core / 1048576)) MiB"

# bitsandbytes only if it fits: it is the QLoRA base's 4-bit kernels
bnb_version=$("$PY" -c "import importlib.metadata as m; print(m.version('bitsandbytes'))")
mkdir -p "$OUT/.bnb"
download -d "$OUT/.bnb" "bitsandbytes==$bnb_version"
bnb=$(du -cb "$OUT"/.bnb/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
if [ $(( (core + bnb + tree) / 1048576 )) -lt "$LIMIT_MIB" ]; then
  mv "$OUT"/.bnb/*.whl "$OUT"/
  echo "bitsandbytes==$bnb_version" >> "$OUT/requirements.txt"
  echo "bitsandbytes $bnb_version: $((bnb / 1048576)) MiB, included"
else
  echo "bitsandbytes $bnb_version: $((bnb / 1048576)) MiB, LEFT OUT: core $((core / 1048576)) + bitsandbytes" \
       "+ working tree $((tree / 1048576)) MiB would pass $LIMIT_MIB MiB; gpu_check.py will skip QLoRA" \
       "(bash benchmarks/gpu_wheels.sh --lean leaves out what the H200 image has)"
  echo "# bitsandbytes left out: $((bnb / 1048576)) MiB would not fit" >> "$OUT/requirements.txt"
fi
rm -rf "$OUT/.bnb"
total=$(du -cb "$OUT" | tail -1 | cut -f1)
echo "wheels/gpu: $(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1048576)) MiB ($total bytes);" \
     "with the working tree $(( (total + tree) / 1048576 )) MiB of the 64 MiB that travel"
echo "carry it: run(command='bash benchmarks/gpu_check.sh', carry=['wheels/gpu'])"

#!/usr/bin/env bash
# Downloads, into .whl/, the wheels scripts/gpu_check.sh needs on the GPU machine (Python 3.12,
# x86-64) and that machine lacks: vlamp's dependencies other than those its image already holds
# (torch, numpy, pyyaml, tqdm, pyarrow, pillow, imageio, safetensors, tensorboard, matplotlib,
# pytest, typing-inspect; av is left out: only video datasets need it, and it would not fit in a
# device call with the rest). Run here, with network, from the repository root; .whl/ is git-ignored.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for n in 2_28 2_27 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  metaworld==3.1.1 mujoco==3.3.0 gymnasium==1.4.0 farama-notifications glfw pyopengl \
  draccus==0.11.6 mergedeep toml
ls -1 .whl

#!/usr/bin/env bash
# Fetch the optional benchmark peer's wheel for the GPU machine, which has no package
# index: run HERE (where PyPI is reachable), then name bench/wheels in the device call's
# carry (the folder is git-ignored: wheels are build inputs, not sources):
#
#   bash bench/fetch_wheels.sh
#   device run: command="bash bench/device_check.sh $OUT", carry=["bench/wheels"]
#
# Liger-Kernel is pure Python (py3-none-any, ~0.9 MB); its needs (torch, triton,
# packaging) are already on the GPU machine, so it is fetched with --no-deps. The
# version is pinned because bench/common.py calls LigerCrossEntropyFunction.apply with
# 0.8.x's argument order.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
mkdir -p wheels
rm -f wheels/liger_kernel-*.whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d wheels "liger-kernel==${LIGER_VERSION}"
ls -l wheels/*.whl

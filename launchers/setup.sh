#!/usr/bin/env bash
# Create .venv/ at the repository root and install dtrain into it (editable, with test tools).
#
#   bash launchers/setup.sh
#
# PyTorch: a torch already importable in .venv (or, for a new .venv, in the Python that
# runs this script, e.g. an NGC / pytorch image) is kept. Otherwise a GPU machine
# (nvidia-smi lists a GPU) gets pip's default CUDA build, and a CPU-only machine gets the
# CPU build (torch==$DTRAIN_TORCH_CPU+cpu: a local wheel when pip has one, else PyTorch's
# CPU index), never the multi-GB CUDA build. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_CPU=${DTRAIN_TORCH_CPU:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2); }

if "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed, kept"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing pip's default (CUDA) torch"
  pip_install "torch>=2.6"
else
  echo "setup: no GPU, installing the CPU build torch==${TORCH_CPU}+cpu"
  pip_install "torch==${TORCH_CPU}+cpu" 2>/dev/null \
    || pip_install "torch==${TORCH_CPU}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

# The optional integrations (Hugging Face models and datasets, Ray Train) come too: their tests
# run here. A user's own `pip install -e .` stays without them.
pip_install -e ".[test,hf,ray]"

# torchvision (the `vision` extra, examples/image_folder): the release made for this torch
# (torch 2.X pairs with torchvision 0.(X+15)), pinned so that pip never swaps torch for it. It
# stays only where a plain interpreter imports it: PyPI's torchvision is a CUDA build, which
# beside a CPU-only torch fails to import (`operator torchvision::nms does not exist`) and
# takes `from transformers import AutoModel...` down with it in the user's own scripts.
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)" 2>/dev/null; then
  TV=$("$VPY" -c "import torch; major, minor = torch.__version__.split('.')[:2]; print(f'0.{int(minor) + 15}.*')")
  pip_install "torchvision==$TV" "torch==$("$VPY" -c 'import torch; print(torch.__version__)')" \
    && echo "setup: torchvision $TV installed" || echo "setup: torchvision $TV not installed (the image-folder example test skips)"
fi
if ! "$VPY" -c "import torchvision" >/dev/null 2>&1 && "$VPY" -m pip show -q torchvision >/dev/null 2>&1; then
  "$VPY" -m pip uninstall -y -q torchvision >/dev/null
  echo "setup: torchvision removed: this build does not import beside this torch (a CUDA wheel beside the CPU torch); the image-folder example test skips"
fi

if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # DeepSpeed JIT-compiles its CPU comm op on first use; build it now, once, so that ranks
  # never race to compile it (dtrain also lets local rank 0 build first at run time).
  # With .venv/bin first on PATH, as in an activated venv (and in every rank the tests start):
  # the extension is built by the ninja there, and a build by another ninja would be redone.
  PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu "$VPY" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)" \
    >/dev/null 2>&1 && echo "setup: DeepSpeed CPU comm op built" || echo "setup: DeepSpeed CPU comm op not built (built at first use)"
fi
echo "setup: $("$VPY" -m dtrain --version), torch $("$VPY" -c 'import torch; print(torch.__version__)'), in .venv/"

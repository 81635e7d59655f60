# Source on the GPU machine: installs the carried wheels (.whl/) and promtool, sets PYTHONPATH.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -f .whl/promtool.gz ]; then gunzip -c .whl/promtool.gz > /tmp/promtool && chmod +x /tmp/promtool; fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, diffusers, transformers, pynvml, prometheus_client; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| nvidia-ml-py", pynvml.__version__ if hasattr(pynvml, "__version__") else "?", "| prometheus_client", prometheus_client.__version__ if hasattr(prometheus_client, "__version__") else "?")'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

#!/usr/bin/env bash
# call 1, run on a bare H200 with the tool `device` as `T_EAGER=200 T_COMP=150 bash .gpu/check.sh`,
# the CIFAR-10 JPEG zip carried in .gpu/ (git-ignored). First GPU evidence (issue 23, before gpu_check.py):
# env, every --smoke on CUDA,
# throughput at full size eager, then compiled for two methods. Each part guarded by timeout.
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O
L=$O/log.txt
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*" | tee -a $L; }
stamp env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch,torchvision,sys;print(sys.version.split()[0],torch.__version__,torchvision.__version__,torch.cuda.get_device_name())"; nproc; } 2>&1 | tee -a $L
stamp unzip
mkdir -p /tmp/data && python3 -m zipfile -e .gpu/cifar10-jpeg.zip /tmp/data 2>&1 | tail -3 | tee -a $L
ls /tmp/data/cifar10-jpeg | tee -a $L
for m in simsiam byol simclr swav directclr; do
  stamp "smoke $m"
  timeout 120 python3 $m.py --smoke --out-dir /tmp/runs 2>&1 | tail -15 | tee -a $L
  echo "rc=${PIPESTATUS[0]}" | tee -a $L
done
stamp "throughput eager"
timeout ${T_EAGER:-200} python3 benchmarks/throughput.py --dataset folder --data-dir /tmp/data/cifar10-jpeg \
  --out $O/throughput_eager.md 2> $O/throughput_eager.err | tee -a $L
echo "rc=${PIPESTATUS[0]}" | tee -a $L; tail -25 $O/throughput_eager.err | tee -a $L
stamp "throughput compiled"
timeout ${T_COMP:-180} python3 benchmarks/throughput.py --dataset folder --data-dir /tmp/data/cifar10-jpeg \
  --methods ${COMP_METHODS:-simsiam simclr} --out $O/throughput_compile.md -- --compile 2> $O/throughput_compile.err | tee -a $L
echo "rc=${PIPESTATUS[0]}" | tee -a $L; tail -25 $O/throughput_compile.err | tee -a $L
stamp done

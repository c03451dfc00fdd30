#!/usr/bin/env bash
# make gpu-check: the GPU check of bench/gpu_check.py, also on a machine without the project's
# .venv and without a package registry (the device machine): the Python packages it lacks are
# installed from the wheels that `make gpu-carry` put into .carry/wheels, into a folder of their
# own on PYTHONPATH (never into that machine's Python), and the CIFAR-10 archive that `make
# gpu-carry` copied into .carry/ is passed on (used on a GPU; --smoke keeps its tiny folder).
# Arguments go to bench/gpu_check.py, e.g. --stages data,cuda_tests,throughput.
#
# Variables: SODA_PYTHON (the interpreter; default .venv/bin/python, else python3), SODA_CARRY
# (default .carry), SODA_CHECK_PACKAGES (where the carried wheels are installed; default
# .gpu-check/packages, git-ignored, so a second call on the same machine reuses them).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
carry=${SODA_CARRY:-.carry}
packages=${SODA_CHECK_PACKAGES:-$PWD/.gpu-check/packages}
python=${SODA_PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
needed='import hydra, omegaconf, mlflow, optuna, submitit, ema_pytorch, hydra_plugins.hydra_submitit_launcher'
if ! "$python" -c "$needed" 2>/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$packages" SODA_CHECK_PACKAGES="$packages"
    if ! "$python" -c "$needed" 2>/dev/null; then
        if ! compgen -G "$carry/wheels/*.whl" >/dev/null; then
            echo "gpu-check failed install: $python lacks the project's packages and $carry/wheels holds no wheels; run make install (here) or make gpu-carry (before sending the checkout to a GPU machine)"
            exit 1
        fi
        if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$packages" "$carry"/wheels/*.whl; then
            echo "gpu-check failed install: pip could not install the wheels of $carry/wheels into $packages"
            exit 1
        fi
        if ! missing=$("$python" -c "$needed" 2>&1); then
            echo "gpu-check failed install: still missing after installing $carry/wheels: $(echo "$missing" | tail -n 1)"
            exit 1
        fi
        echo "# installed $(ls "$carry"/wheels/*.whl | wc -l) carried wheels into $packages in $(($(date +%s) - started)) s"
    else
        echo "# carried packages already installed in $packages"
    fi
fi
archive=()
if [[ -f "$carry/cifar10-jpeg.tar.gz" ]]; then archive=(--carried-archive "$carry/cifar10-jpeg.tar.gz"); fi
exec "$python" bench/gpu_check.py --started "$started" "${archive[@]}" "$@"

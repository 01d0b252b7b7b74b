#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's GPU tables (taken on one H100 in calls of at most 10 minutes):
#
#   PYTHONPATH=src benchmarks/run_gpu.sh OUT_DIR SECONDS STEP...
#
# STEPs: generate train train-compile tokenize sample evaluate (and smoke: toy sizes of the generate, tokenize,
# sample and evaluate paths, in parallel, correctness only). Each step runs under `timeout` within SECONDS for
# the whole call; its table goes to OUT_DIR. On an image without torch-fidelity and jsonschema, install them as
# wheels with `pip install --no-deps --target /tmp/site` and put that on PYTHONPATH before src. Steps marked
# "official" need the official code in .cache/official/ (git-ignored: carry it to the device).
#
# generate (official; issue 18, ~8 minutes of one H100/H200): every GPU figure of bench_generate.py in one
# process: our sampler (CUDA graphs; torch.compile'd steps; attention over all cache slots) against the
# official LlamaGen and VAR samplers on GPT-L, GPT-XL, VAR-d16 and VAR-d30 at paper settings, graph-vs-
# reference token agreement and the noise's CPU/GPU bit identity:
#   PYTHONPATH=src benchmarks/run_gpu.sh /tmp/out 540 generate
#
# train, train-compile (official; issue 19, ~5 minutes): `train` is eager (ours, ours at the official
# micro-batch, the official step; GPT-L, GPT-XL, VAR-d16, VAR-d24; loss-path memory; a profile),
# `train-compile` ours with compile: true on GPT-L and GPT-XL. Their records are merged into
# OUT_DIR/bench_train.json, a copy of benchmarks/results/bench_train.json (copy it back):
#   PYTHONPATH=src benchmarks/run_gpu.sh /tmp/out 330 train train-compile
set -u
out=$1
deadline=$((SECONDS + $2))
shift 2
export PYTHONUNBUFFERED=1
mkdir -p "$out"

run() { # run MAX_SECONDS NAME CMD...: CMD under the smaller of MAX_SECONDS and the time left
    local max=$1 name=$2 left=$((deadline - SECONDS - 5)) rc
    shift 2
    local t=$((max < left ? max : left))
    if ((t < 20)); then
        echo "=== SKIP $name (${left}s left)"
        return
    fi
    echo "=== $(date +%T) START $name (timeout ${t}s): $*"
    timeout "$t" "$@"
    rc=$?
    echo "=== $(date +%T) END $name rc=$rc"
}

for step in "$@"; do
    case $step in
    smoke)
        nvidia-smi
        python3 -c 'import torch, torch_fidelity; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), torch_fidelity.__version__)'
        s=/tmp/smoke
        mkdir -p $s
        T=(timeout 150)
        "${T[@]}" python3 benchmarks/bench_generate.py --device cuda --batch 8 --repeats 1 --json $s/g.json \
            --cases GPT-B-64px:ours:graph GPT-B-64px:ours:compile d16-64px:ours:graph >$s/gen.log 2>&1 &
        "${T[@]}" python3 benchmarks/bench_tokenize.py --device cuda --images 8 --storage-images 16 \
            --out $s/k.md >$s/tok.log 2>&1 &
        "${T[@]}" python3 benchmarks/bench_sample.py --device cuda --per-class 2 --out $s/s.md >$s/sample.log 2>&1 &
        "${T[@]}" python3 benchmarks/bench_evaluate.py --device cuda --n-domain 200 --n-inception 100 \
            --batch 50 --out $s/e.md >$s/eval.log 2>&1 &
        wait
        for f in $s/*.log; do
            echo "##### $f"
            tail -n 40 "$f"
        done
        ;;
    generate) # the CPU records already in the results file are kept beside the GPU ones
        cp benchmarks/results/bench_generate.json "$out/" 2>/dev/null
        TORCH_LOGS=recompiles run 520 "$step" python3 benchmarks/bench_generate.py --device cuda --budget 470 --repeats 1 \
            --json "$out/bench_generate.json" --md "$out/bench_generate_gpu.md"
        ;;
    train)
        [[ -f "$out/bench_train.json" ]] || cp benchmarks/results/bench_train.json "$out/"
        run 270 "$step" python3 benchmarks/bench_train.py --device cuda --profile \
            --json "$out/bench_train.json" --out "$out/bench_train_gpu.md"
        ;;
    train-compile)
        [[ -f "$out/bench_train.json" ]] || cp benchmarks/results/bench_train.json "$out/"
        TORCH_LOGS=recompiles run 240 "$step" python3 benchmarks/bench_train.py --device cuda --compile \
            --models llamagen_L llamagen_XL --json "$out/bench_train.json" --out "$out/bench_train_gpu_compile.md"
        ;;
    tokenize)
        run 150 "$step" python3 benchmarks/bench_tokenize.py --device cuda --images 64 --batch 4 \
            --out "$out/bench_tokenize_gpu.md"
        ;;
    sample) # per_class 1 and fewer classes: 48 GPT-L samples (one batch) and 96 VAR-d16 samples per run
        run 300 "$step" python3 benchmarks/bench_sample.py --device cuda --config config/paper.yaml \
            --models llamagen_L var_d16 --per-class 1 --set models.llamagen_L.args.num_classes=48 \
            --set models.var_d16.args.num_classes=96 --out "$out/bench_sample_gpu.md"
        ;;
    evaluate)
        run 240 "$step" python3 benchmarks/bench_evaluate.py --device cuda --n-inception 20000 \
            --n-reference 10000 --batch 250 --out "$out/bench_evaluate_gpu.md"
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2
        ;;
    esac
done

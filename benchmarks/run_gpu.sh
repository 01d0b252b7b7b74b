#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's GPU tables (taken on one H100 in calls of at most 10 minutes):
#
#   PYTHONPATH=src benchmarks/run_gpu.sh OUT_DIR SECONDS STEP...
#
# STEPs: llamagen-eager llamagen-compile train train-compile var tokenize sample evaluate (and smoke: toy
# sizes of the compile, tokenize, sample and evaluate paths, in parallel, correctness only). Each step runs
# under `timeout` within SECONDS for the whole call; its table goes to OUT_DIR. On an image without
# torch-fidelity and jsonschema, install them as wheels with `pip install --no-deps --target /tmp/site` and
# put that on PYTHONPATH before src.
#
# The training figures (issue 19), about 5 minutes of one H100/H200, in one command:
#
#   PYTHONPATH=src benchmarks/run_gpu.sh OUT_DIR 330 train train-compile
#
# `train` (eager: ours, ours at the official micro-batch, the official step; GPT-L, GPT-XL, VAR-d16, VAR-d24;
# loss-path memory; a profile) and `train-compile` (ours with compile: true, GPT-L and GPT-XL) need the
# official code in .cache/official/CCA (git-ignored: carry it to the device). Their records are merged into
# OUT_DIR/bench_train.json, a copy of benchmarks/results/bench_train.json (copy it back).
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

GPTL='{"preset": "GPT-L", "block_size": 576}'
VAE='{"preset": "vae_ch160v4096z32"}'
gen=(python3 benchmarks/bench_generate.py --device cuda --dtype bfloat16)

for step in "$@"; do
    case $step in
    smoke)
        nvidia-smi
        python3 -c 'import torch, torch_fidelity; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), torch_fidelity.__version__)'
        s=/tmp/smoke
        mkdir -p $s
        tiny='{"preset": "GPT-B", "block_size": 16, "n_layer": 2}'
        T=(timeout 150)
        "${T[@]}" "${gen[@]}" --batch 8 --repeats 1 --family llamagen --model-args "$tiny" --compile \
            --kv-cache on --out $s/g.md >$s/gen_compile.log 2>&1 &
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
    llamagen-eager)
        run 150 "$step" "${gen[@]}" --family llamagen --model-args "$GPTL" --batch 64 --kv-cache on \
            --repeats 2 --out "$out/bench_generate_gpu_llamagen.md"
        ;;
    llamagen-compile)
        TORCH_LOGS=recompiles,perf_hints run 360 "$step" "${gen[@]}" --family llamagen --model-args "$GPTL" \
            --batch 64 256 --kv-cache on --compile --repeats 2 --out "$out/bench_generate_gpu_llamagen_compile.md"
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
    var)
        for d in d16 d24; do
            run 90 "var-$d" "${gen[@]}" --family var --model-args "{\"preset\": \"$d\"}" --tokenizer-args "$VAE" \
                --batch 64 --out "$out/bench_generate_gpu_var_$d.md"
        done
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

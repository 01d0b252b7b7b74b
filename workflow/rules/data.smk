# Raw images, tokenizers and the code cache.


rule prepare_data:
    """The embedded dataset (scikit-learn digits) as train/val image folders."""
    output:
        manifest=data("raw/{dataset}/dataset.json"),
        record=data("raw/{dataset}/dataset.json.job.json"),
    params:
        command=command("prepare_data"),
        settings=settings("prepare_data"),
        code=code("prepare_data"),
    log:
        logs("prepare_data/{dataset}.log"),
    benchmark:
        benchmarks("prepare_data/{dataset}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("prepare_data")
    resources:
        **resources("prepare_data"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"


rule train_tokenizer:
    """A small tokenizer trained on the views the cache will hold (released tokenizers are fetched)."""
    input:
        data=get("train_tokenizer", "data"),
    output:
        tokenizer=data("tokenizers/{tokenizer}/tokenizer.pt"),
        args=data("tokenizers/{tokenizer}/tokenizer.args.json"),
        record=data("tokenizers/{tokenizer}/tokenizer.pt.job.json"),
    params:
        command=command("train_tokenizer"),
        settings=settings("train_tokenizer"),
        code=code("train_tokenizer"),
    log:
        logs("train_tokenizer/{tokenizer}.log"),
    benchmark:
        benchmarks("train_tokenizer/{tokenizer}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("train_tokenizer")
    resources:
        **resources("train_tokenizer"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"


rule tokenize:
    """Every view of every training image → the sharded uint16 code cache (resumable)."""
    input:
        data=get("tokenize", "data"),
        tokenizer=get("tokenize", "tokenizer"),
    output:
        cache=data("cache/{tokenizer}/manifest.json"),
        record=data("cache/{tokenizer}/manifest.json.job.json"),
    params:
        command=command("tokenize"),
        settings=settings("tokenize"),
        code=code("tokenize"),
    log:
        logs("tokenize/{tokenizer}.log"),
    benchmark:
        benchmarks("tokenize/{tokenizer}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("tokenize")
    resources:
        **resources("tokenize"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

# Class-balanced, deterministic, resumable generation.


rule sample:
    """per_class samples of every class from one model at one guidance scale, and a sample grid."""
    input:
        checkpoint=get("sample", "checkpoint"),
        tokenizer=get("sample", "tokenizer"),
    output:
        samples=data("samples/{family}/{model}/seed{seed}/{variant}/g{guidance}/samples.npz"),
        grid=data("samples/{family}/{model}/seed{seed}/{variant}/g{guidance}/grid.png"),
        record=data("samples/{family}/{model}/seed{seed}/{variant}/g{guidance}/samples.npz.job.json"),
    params:
        command=command("sample"),
        settings=settings("sample"),
        code=code("sample"),
    log:
        logs("sample/{family}/{model}/seed{seed}/{variant}/g{guidance}.log"),
    benchmark:
        benchmarks("sample/{family}/{model}/seed{seed}/{variant}/g{guidance}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("sample")
    resources:
        **resources("sample"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

# Released checkpoints, tokenizers, Inception weights and reference batches.


rule fetch:
    """One artifact of config/weights.yaml: downloaded, sha256-verified, recorded in the weights lock."""
    input:
        manifest=get("fetch", "manifest"),
    output:
        weights=data("weights/{artifact}"),
        record=data("weights/{artifact}.job.json"),
    params:
        command=command("fetch"),
        settings=settings("fetch"),
        code=code("fetch"),
    log:
        logs("fetch/{artifact}.log"),
    benchmark:
        benchmarks("fetch/{artifact}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("fetch")
    resources:
        **resources("fetch"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

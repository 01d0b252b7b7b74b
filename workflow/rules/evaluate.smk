# Feature extractors and metrics.


rule train_classifier:
    """The domain classifier: feature extractor of FID/IS/PRC for small datasets."""
    input:
        data=get("train_classifier", "data"),
    output:
        classifier=data("classifier/{dataset}/classifier.pt"),
        record=data("classifier/{dataset}/classifier.pt.job.json"),
    params:
        command=command("train_classifier"),
        settings=settings("train_classifier"),
        code=code("train_classifier"),
    log:
        logs("train_classifier/{dataset}.log"),
    benchmark:
        benchmarks("train_classifier/{dataset}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("train_classifier")
    resources:
        **resources("train_classifier"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"


rule evaluate:
    """FID, IS, Precision, Recall, sFID (+ class accuracy) of one sample set against the reference."""
    input:
        samples=get("evaluate", "samples"),
        reference=get("evaluate", "reference"),
        data=get("evaluate", "data"),
        classifier=get("evaluate", "classifier"),
        inception=get("evaluate", "inception"),
    output:
        metrics=data("eval/{family}/{model}/seed{seed}/{variant}/g{guidance}/metrics.json"),
        record=data("eval/{family}/{model}/seed{seed}/{variant}/g{guidance}/metrics.json.job.json"),
    params:
        command=command("evaluate"),
        settings=settings("evaluate"),
        code=code("evaluate"),
    log:
        logs("evaluate/{family}/{model}/seed{seed}/{variant}/g{guidance}.log"),
    benchmark:
        benchmarks("evaluate/{family}/{model}/seed{seed}/{variant}/g{guidance}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("evaluate")
    resources:
        **resources("evaluate"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

# Results table, FID–IS plot and sample grids.


rule report:
    """summary.csv / summary.md, the FID–IS plot and upscaled sample grids; sends buffered MLflow runs."""
    input:
        metrics=get("report", "metrics"),
        grids=get("report", "grids"),
    output:
        summary=report(data("report/summary.csv"), caption="../report/summary.rst", category="Results"),
        table=data("report/summary.md"),
        plot=report(data("report/fid_is.png"), caption="../report/fid_is.rst", category="Results"),
        grids=report(
            directory(data("report/grids")),
            patterns=["{family}/{model}/{name}.png"],
            caption="../report/grids.rst",
            category="Sample grids",
        ),
        record=data("report/summary.csv.job.json"),
    params:
        command=command("report"),
        settings=settings("report"),
        code=code("report"),
    log:
        logs("report.log"),
    benchmark:
        benchmarks("report.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("report")
    resources:
        **resources("report"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

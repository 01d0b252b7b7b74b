# One page per target (a table or figure of the paper), and a rule per target: `snakemake table3`.


rule report:
    """A target's tables beside the paper's numbers, its FID–IS figure and upscaled sample grids."""
    input:
        metrics=get("report", "metrics"),
        grids=get("report", "grids"),
    output:
        summary=report(data("report/{target}/summary.csv"), caption="../report/summary.rst", category="{target}"),
        table=data("report/{target}/summary.md"),
        page=data("report/{target}/summary.html"),
        plot=report(data("report/{target}/fid_is.png"), caption="../report/fid_is.rst", category="{target}"),
        grids=report(
            directory(data("report/{target}/grids")),
            patterns=["{model}/{name}.png"],
            caption="../report/grids.rst",
            category="{target}",
        ),
        record=data("report/{target}/summary.csv.job.json"),
    params:
        command=command("report"),
        settings=settings("report"),
        code=code("report"),
    log:
        logs("report/{target}.log"),
    benchmark:
        benchmarks("report/{target}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("report")
    resources:
        **resources("report"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"


for name in PLAN.targets:  # `snakemake <target>` makes one table or figure, and only what it needs

    rule:
        name:
            name
        input:
            data(f"report/{name}/summary.csv"),

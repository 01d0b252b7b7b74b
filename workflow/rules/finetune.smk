# Base models (embedded: pretrained here) and CCA / DPO / unlearning fine-tuning.


rule pretrain:
    """Maximum likelihood with class dropout, from scratch (the embedded experiment's base models)."""
    input:
        tokenizer=get("pretrain", "tokenizer"),
        cache=get("pretrain", "cache"),
    output:
        model=data("pretrain/{family}/{model}/seed{seed}/model.pt"),
        args=data("pretrain/{family}/{model}/seed{seed}/model.args.json"),
        record=data("pretrain/{family}/{model}/seed{seed}/model.pt.job.json"),
    params:
        command=command("pretrain"),
        settings=settings("pretrain"),
        code=code("pretrain"),
    log:
        logs("pretrain/{family}/{model}/seed{seed}.log"),
    benchmark:
        benchmarks("pretrain/{family}/{model}/seed{seed}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("pretrain")
    resources:
        **resources("pretrain"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"


rule finetune:
    """One alignment run per (model, seed, objective, λ): the policy against its frozen base copy."""
    input:
        base=get("finetune", "base"),
        tokenizer=get("finetune", "tokenizer"),
        cache=get("finetune", "cache"),
    output:
        model=data("finetune/{family}/{model}/seed{seed}/{variant}/model.pt"),
        args=data("finetune/{family}/{model}/seed{seed}/{variant}/model.args.json"),
        record=data("finetune/{family}/{model}/seed{seed}/{variant}/model.pt.job.json"),
    params:
        command=command("finetune"),
        settings=settings("finetune"),
        code=code("finetune"),
    log:
        logs("finetune/{family}/{model}/seed{seed}/{variant}.log"),
    benchmark:
        benchmarks("finetune/{family}/{model}/seed{seed}/{variant}.tsv")
    conda:
        "../envs/ccalign.yaml"
    threads: threads("finetune")
    resources:
        **resources("finetune"),
    shell:
        "OMP_NUM_THREADS={threads} {params.command} > {log} 2>&1"

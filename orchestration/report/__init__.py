"""Results: the store's runs read into one frame (`runs`), the paper's tables built from them (`tables`)
and written as Markdown, CSV and LaTeX (`render`); `orchestration/aggregate.py` is the command."""

"""lm-eval task templates and small data files shipped with tokentransplant.

The templates carry `$placeholders` (string.Template) because lm-eval needs absolute `data_files` paths:
`transplant.eval.lmeval` fills them in and writes concrete task YAMLs into the cache at run time.
"""

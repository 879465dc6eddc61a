"""Reading and writing what a run leaves: parameters by flat name (`params`), atomic directories and their
JSON / safetensors files (`files`), the longctx export directory (`export_dir`) and a run's checkpoint path
and saved config (`runs`). Below both training and eval, so neither imports the other for these."""

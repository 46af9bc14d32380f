"""The benchmark build: config, shard plan, DAG, runner, executors and the stages."""

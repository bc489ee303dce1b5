"""Scale-out: running the jobs' tasks in this process or on Ray."""

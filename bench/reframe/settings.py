"""ReFrame configuration for the hpc-localsgd benchmark check (the environment is ReFrame's ``builtin``).

``local`` (any host): ranks started by the check itself with mpirun. ``slurm``: select it with
``--system slurm:compute`` and adapt the partition (access options, environment modules) to your site;
its ranks are started by srun.
"""

site_configuration = {
    "systems": [
        {
            "name": "slurm",
            "descr": "a Slurm cluster; choose with --system slurm:compute",
            "hostnames": ["^$"],  # never matched by host name: only by --system
            "partitions": [
                {
                    "name": "compute",
                    "scheduler": "slurm",
                    "launcher": "srun",
                    "access": [],
                    "environs": ["builtin"],
                    "max_jobs": 4,
                },
            ],
        },
        {
            "name": "local",
            "descr": "this machine; the check runs mpirun itself",
            "hostnames": [".*"],
            "partitions": [
                {
                    "name": "default",
                    "scheduler": "local",
                    "launcher": "local",
                    "environs": ["builtin"],
                    "max_jobs": 1,
                },
            ],
        },
    ],
    "logging": [
        {
            # In the folder reframe runs from (not the system's temporary folder); perflogs go to
            # <prefix>/perflogs as usual.
            "handlers": [
                {
                    "type": "file",
                    "name": "reframe.log",
                    "level": "debug",
                    "format": "[%(asctime)s] %(levelname)s: %(check_info)s: %(message)s",
                    "append": False,
                },
                {"type": "stream", "name": "stdout", "level": "info", "format": "%(message)s"},
            ],
        },
    ],
}

"""The `ft` command line and the launchers it builds commands for (workstation, Slurm)."""

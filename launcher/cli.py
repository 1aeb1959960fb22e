"""`ft`: the command line. Each subcommand parses, validates, then dispatches; none imports torch unless it runs
training or generation.

    ft config examples/demo.yaml --set train.lr=1e-4       print the resolved config
    ft launch examples/demo.yaml --nproc 2                 train on this machine in 2 processes (DeepSpeed)
    ft launch examples/demo.yaml --nproc 2 --dry-run       print the launch command and exit
    ft slurm examples/demo.yaml --nodes 2 --gpus-per-node 8   submit a multi-node job (sbatch slurm/ft.sbatch)
    ft plan examples/llama-2-70b-qlora.yaml --gpus-per-node 2 --gpu-mem-gb 40   memory per GPU, before launching
    ft plot outputs/demo                                    loss, learning rate and tokens/s as a PNG
    ft train examples/demo.yaml                            train in the current process(es)
    ft generate --model outputs/demo/final --prompt "What is the capital of France?"
    ft data inspect examples/demo.yaml -n 3                show processed samples (trained tokens marked) + stats
    ft export --adapter outputs/demo/final --out outputs/demo/merged   merge LoRA into the base, shard by shard
"""

from launcher import run_commands, tool_commands  # noqa: F401  (each registers its commands on the app)
from launcher.app import app


def main() -> None:
    """The `ft` console script."""
    app()


if __name__ == "__main__":
    main()

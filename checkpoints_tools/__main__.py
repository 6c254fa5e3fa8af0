from checkpoints_tools.cli import app

if __name__ == "__main__":
    app(prog_name="python -m checkpoints_tools")

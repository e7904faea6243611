"""`python train.py [group=option ...] [key=value ...]`: one fine-tuning run (conf/train.yaml)."""

from fulltune.train import main

if __name__ == "__main__":
    main()

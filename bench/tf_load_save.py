"""Reference contender: the AWS tool's way, load the model in TensorFlow and save it again."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf

if __name__ == "__main__":
    tf.saved_model.save(tf.saved_model.load(sys.argv[1]), sys.argv[2])

"""Input pipelines: seqio Tasks, span corruption, tfds image pipelines."""

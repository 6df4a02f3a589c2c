import pandas as pd
import torch
from clip_benchmark.metrics import zeroshot_retrieval

from analysis.report import default_plot_metrics, headline_table
from clustermask.evaluate import EvalTask, metric_key

# two images and one caption each; caption b is closest to image A, so the directions disagree:
# text -> image: a finds A, b finds A (wrong): 0.5; image -> text: A finds b (wrong), B finds a (wrong): 0.0
IMAGES = {0: (1.0, 0.0), 1: (0.0, 1.0)}
CAPTIONS = {"a": (1.0, 0.9), "b": (1.0, 0.05)}


class Embeddings(torch.nn.Module):
    def encode_image(self, index):
        return torch.tensor([IMAGES[int(i)] for i in index])

    def encode_text(self, index):
        return torch.tensor([list(CAPTIONS.values())[int(i)] for i in index])


def test_retrieval_columns_name_the_direction_clip_benchmark_measured():
    loader = [(torch.tensor([0, 1]), [["a"], ["b"]])]
    tokenize = lambda texts: torch.tensor([list(CAPTIONS).index(t) for t in texts])  # noqa: E731
    metrics = zeroshot_retrieval.evaluate(Embeddings(), loader, tokenize, "cpu", amp=False, recall_k_list=[1])
    task = EvalTask("zeroshot_retrieval", "wds/scenes", "")
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0,
                           **{metric_key(task, name): value for name, value in metrics.items()}}])
    row = headline_table(frame).iloc[0]
    assert row["t2i_r1"] == 0.5 and row["i2t_r1"] == 0.0


def test_headline_has_a_column_per_dataset_named_after_it_when_there_are_several():
    """A paper sweep evaluates zero-shot on many datasets: each gets its column (and a plot); a task evaluated
    on one dataset keeps the short name."""
    metrics = {"zeroshot_classification/wds/imagenet1k/acc1": 0.3, "zeroshot_classification/wds/cifar10/acc1": 0.6,
               "zeroshot_retrieval/wds/mscoco_captions/text_retrieval_recall_at_1": 0.2,
               "image_caption_selection/sugar_crepe/swap_att/acc": 0.7}
    frame = pd.DataFrame([{"label": "cluster-rgb", "ratio": 0.5, "seed": 0, **metrics}])
    row = headline_table(frame).iloc[0].to_dict()
    assert row == {"label": "cluster-rgb", "ratio": 0.5, "seed": 0, "zs_acc1_cifar10": 0.6, "zs_acc1_imagenet1k": 0.3,
                   "i2t_r1": 0.2, "sc_swap_att": 0.7, "sc_mean": 0.7}
    assert default_plot_metrics(frame) == ["zeroshot_classification/wds/cifar10/acc1",
                                           "zeroshot_classification/wds/imagenet1k/acc1",
                                           "image_caption_selection/sugar_crepe/swap_att/acc"]

"""Small models and datasets shared by tests (deterministic from a seed; importable by subprocesses)."""

import torch
from torch import nn


class VGGLike(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))) + self.down(x))


class ResNetLike(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def make_model(name="vgg", seed=0):
    torch.manual_seed(seed)
    model = {"vgg": VGGLike, "resnet": ResNetLike}[name]()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


class ImageSet(torch.utils.data.Dataset):
    """Random pixel-space images with labels (or without), optionally slow to load."""

    def __init__(self, n=23, size=16, classes=4, labels=True, seed=0, delay=0.0, quantise=False):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        if quantise:  # many exact ties between images
            self.images = (self.images * 2).round() / 2
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.with_labels, self.delay = labels, delay
        self.classes = [f"class{i}" for i in range(classes)] if labels else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.delay:
            import time

            time.sleep(self.delay)
        return (self.images[i], int(self.labels[i])) if self.with_labels else self.images[i]


def make_sequential(seed=0):
    """A plain nn.Sequential: its layers are named "0", "1", ... (names that read as numbers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()

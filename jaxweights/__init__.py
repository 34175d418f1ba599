"""jaxweights: one clean way to reach the weights inside model checkpoints from JAX."""

from importlib import metadata as _metadata

from . import _bulk as _bulk  # the load planner, with the package rather than on the first load
from . import errors as errors
from ._dequant import dequantize as dequantize
from ._devices import DeviceKind as DeviceKind
from ._devices import DeviceRef as DeviceRef
from ._display import Summary as Summary
from ._display import Totals as Totals
from ._dtypes import DType as DType
from ._graph import Graph as Graph
from ._graph import GraphConstantWarning as GraphConstantWarning
from ._graph import GraphFunction as GraphFunction
from ._keymap import GGUF_TO_HF as GGUF_TO_HF
from ._keymap import TORCH_TO_FLAX as TORCH_TO_FLAX
from ._keymap import Concat as Concat
from ._keymap import KeyMap as KeyMap
from ._keymap import Split as Split
from ._keymap import TorchKernel as TorchKernel
from ._keymap import Transpose as Transpose
from ._keymap import UnpermuteHeads as UnpermuteHeads
from ._manager import CheckpointManager as CheckpointManager
from ._manager import IncompleteStepWarning as IncompleteStepWarning
from ._manager import SaveStats as SaveStats
from ._quantization import BlockParameters as BlockParameters
from ._quantization import QuantizationEncoding as QuantizationEncoding
from ._restore import RestoreReport as RestoreReport
from ._save import save as save
from ._stream import stream_layers as stream_layers
from ._weights import Weight as Weight
from ._weights import WeightData as WeightData
from ._weights import Weights as Weights
from ._weights import load_weights as load_weights
from ._weights import restore as restore
from .formats import Checkpoint as Checkpoint
from .formats import TensorInfo as TensorInfo
from .formats import WeightsFormat as WeightsFormat
from .formats import open_checkpoint as open_checkpoint
from .formats import weights_format as weights_format
from .formats.safetensors import save_file as save_file

try:
    __version__ = _metadata.version("jaxweights")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

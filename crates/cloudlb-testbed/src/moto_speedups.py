# Loaded into the benchmark's moto server as `sitecustomize` (unless `--stock-moto`).
#
# Two lookups in moto 5.2 cost O(everything) per target and make RegisterTargets quadratic in the
# number of instances, so at 1000 Nodes moto spends ~0.5 s per call and bounds the whole benchmark
# on one core. Both replacements return exactly what the originals return; they only skip work:
#
# - BackendDict.__getitem__ takes a global lock, lists every account and scans every service's
#   backend registry on each access, even when the account's backend already exists.
# - EC2 get_instance_by_id shallow-copies every reservation before searching them.
#
# Nothing here changes what moto accepts, rejects or stores.

from moto.core import base_backend as _bb
from moto.ec2.models import instances as _inst

_orig_getitem = _bb.BackendDict.__getitem__


def _getitem(self, account_id):
    if dict.__contains__(self, account_id):
        return dict.__getitem__(self, account_id)
    return _orig_getitem(self, account_id)


_bb.BackendDict.__getitem__ = _getitem


def _get_instance_by_id(self, instance_id):
    for reservation in list(self.reservations.values()):
        for instance in reservation.instances:
            if instance.id == instance_id:
                return instance
    return None


_inst.InstanceBackend.get_instance_by_id = _get_instance_by_id

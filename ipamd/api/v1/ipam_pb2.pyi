from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Owner(_message.Message):
    __slots__ = ("network", "container_id", "ifname", "pod_namespace", "pod_name", "pod_uid")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    network: str
    container_id: str
    ifname: str
    pod_namespace: str
    pod_name: str
    pod_uid: str
    def __init__(self, network: _Optional[str] = ..., container_id: _Optional[str] = ..., ifname: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_uid: _Optional[str] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("ip", "gateway", "subnet", "owner", "node", "since", "netns", "host_veth")
    IP_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    HOST_VETH_FIELD_NUMBER: _ClassVar[int]
    ip: str
    gateway: str
    subnet: str
    owner: Owner
    node: str
    since: float
    netns: str
    host_veth: str
    def __init__(self, ip: _Optional[str] = ..., gateway: _Optional[str] = ..., subnet: _Optional[str] = ..., owner: _Optional[_Union[Owner, _Mapping]] = ..., node: _Optional[str] = ..., since: _Optional[float] = ..., netns: _Optional[str] = ..., host_veth: _Optional[str] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("owner", "requested_ip", "netns")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_IP_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    owner: Owner
    requested_ip: str
    netns: str
    def __init__(self, owner: _Optional[_Union[Owner, _Mapping]] = ..., requested_ip: _Optional[str] = ..., netns: _Optional[str] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("allocation", "existed")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    allocation: Allocation
    existed: bool
    def __init__(self, allocation: _Optional[_Union[Allocation, _Mapping]] = ..., existed: _Optional[bool] = ...) -> None: ...

class Handle(_message.Message):
    __slots__ = ("network", "container_id", "ifname")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    network: str
    container_id: str
    ifname: str
    def __init__(self, network: _Optional[str] = ..., container_id: _Optional[str] = ..., ifname: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: Handle
    def __init__(self, handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "ip")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    released: bool
    ip: str
    def __init__(self, released: _Optional[bool] = ..., ip: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: Handle
    def __init__(self, handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("found", "allocation")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    allocation: Allocation
    def __init__(self, found: _Optional[bool] = ..., allocation: _Optional[_Union[Allocation, _Mapping]] = ...) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("container_id", "ifname")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    ifname: str
    def __init__(self, container_id: _Optional[str] = ..., ifname: _Optional[str] = ...) -> None: ...

class GCRequest(_message.Message):
    __slots__ = ("network", "valid_attachments")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    VALID_ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    network: str
    valid_attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    def __init__(self, network: _Optional[str] = ..., valid_attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ...) -> None: ...

class GCResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released: _Optional[_Iterable[str]] = ...) -> None: ...

class SubnetStatus(_message.Message):
    __slots__ = ("subnet", "gateway", "total", "used", "free", "cooling")
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    COOLING_FIELD_NUMBER: _ClassVar[int]
    subnet: str
    gateway: str
    total: int
    used: int
    free: int
    cooling: int
    def __init__(self, subnet: _Optional[str] = ..., gateway: _Optional[str] = ..., total: _Optional[int] = ..., used: _Optional[int] = ..., free: _Optional[int] = ..., cooling: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "ready", "reason", "network", "subnets", "allocations", "cooldown_seconds", "conflicts")
    NODE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    node: str
    ready: bool
    reason: str
    network: str
    subnets: _containers.RepeatedCompositeFieldContainer[SubnetStatus]
    allocations: _containers.RepeatedCompositeFieldContainer[Allocation]
    cooldown_seconds: float
    conflicts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ..., network: _Optional[str] = ..., subnets: _Optional[_Iterable[_Union[SubnetStatus, _Mapping]]] = ..., allocations: _Optional[_Iterable[_Union[Allocation, _Mapping]]] = ..., cooldown_seconds: _Optional[float] = ..., conflicts: _Optional[_Iterable[str]] = ...) -> None: ...

class NetworkConfig(_message.Message):
    __slots__ = ("network", "subnet_len", "subnet_min", "subnet_max", "fixed_ranges", "backend", "cluster_id", "vni", "vxlan_port")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    SUBNET_LEN_FIELD_NUMBER: _ClassVar[int]
    SUBNET_MIN_FIELD_NUMBER: _ClassVar[int]
    SUBNET_MAX_FIELD_NUMBER: _ClassVar[int]
    FIXED_RANGES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    VNI_FIELD_NUMBER: _ClassVar[int]
    VXLAN_PORT_FIELD_NUMBER: _ClassVar[int]
    network: str
    subnet_len: int
    subnet_min: str
    subnet_max: str
    fixed_ranges: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    cluster_id: str
    vni: int
    vxlan_port: int
    def __init__(self, network: _Optional[str] = ..., subnet_len: _Optional[int] = ..., subnet_min: _Optional[str] = ..., subnet_max: _Optional[str] = ..., fixed_ranges: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ..., cluster_id: _Optional[str] = ..., vni: _Optional[int] = ..., vxlan_port: _Optional[int] = ...) -> None: ...

class NetworkShowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NetworkShowResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: NetworkConfig
    def __init__(self, config: _Optional[_Union[NetworkConfig, _Mapping]] = ...) -> None: ...

class NetworkInitRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: NetworkConfig
    def __init__(self, config: _Optional[_Union[NetworkConfig, _Mapping]] = ...) -> None: ...

class NetworkInitResponse(_message.Message):
    __slots__ = ("config", "created")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    config: NetworkConfig
    created: bool
    def __init__(self, config: _Optional[_Union[NetworkConfig, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class SubnetUsage(_message.Message):
    __slots__ = ("subnet", "node", "public_ip", "since", "backend_json", "total", "reserved", "allocated", "cooling", "free", "route_state", "route_reason")
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_IP_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    COOLING_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_REASON_FIELD_NUMBER: _ClassVar[int]
    subnet: str
    node: str
    public_ip: str
    since: float
    backend_json: str
    total: int
    reserved: int
    allocated: int
    cooling: int
    free: int
    route_state: str
    route_reason: str
    def __init__(self, subnet: _Optional[str] = ..., node: _Optional[str] = ..., public_ip: _Optional[str] = ..., since: _Optional[float] = ..., backend_json: _Optional[str] = ..., total: _Optional[int] = ..., reserved: _Optional[int] = ..., allocated: _Optional[int] = ..., cooling: _Optional[int] = ..., free: _Optional[int] = ..., route_state: _Optional[str] = ..., route_reason: _Optional[str] = ...) -> None: ...

class ListSubnetsRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ListSubnetsResponse(_message.Message):
    __slots__ = ("subnets",)
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    subnets: _containers.RepeatedCompositeFieldContainer[SubnetUsage]
    def __init__(self, subnets: _Optional[_Iterable[_Union[SubnetUsage, _Mapping]]] = ...) -> None: ...

class ListAllocationsRequest(_message.Message):
    __slots__ = ("node", "pod_namespace", "pod_name")
    NODE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    node: str
    pod_namespace: str
    pod_name: str
    def __init__(self, node: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_name: _Optional[str] = ...) -> None: ...

class ListAllocationsResponse(_message.Message):
    __slots__ = ("allocations",)
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[Allocation]
    def __init__(self, allocations: _Optional[_Iterable[_Union[Allocation, _Mapping]]] = ...) -> None: ...

class AdminReleaseRequest(_message.Message):
    __slots__ = ("ip", "handle")
    IP_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ip: str
    handle: Handle
    def __init__(self, ip: _Optional[str] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class AdminReleaseResponse(_message.Message):
    __slots__ = ("allocation",)
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    allocation: Allocation
    def __init__(self, allocation: _Optional[_Union[Allocation, _Mapping]] = ...) -> None: ...

class NodeRemoveRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class NodeRemoveResponse(_message.Message):
    __slots__ = ("subnets", "ips_freed", "released_cleared")
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    IPS_FREED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_CLEARED_FIELD_NUMBER: _ClassVar[int]
    subnets: _containers.RepeatedScalarFieldContainer[str]
    ips_freed: int
    released_cleared: int
    def __init__(self, subnets: _Optional[_Iterable[str]] = ..., ips_freed: _Optional[int] = ..., released_cleared: _Optional[int] = ...) -> None: ...

class UtilizationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UtilizationResponse(_message.Message):
    __slots__ = ("config", "subnets", "subnets_leased", "subnets_free", "addresses_allocated", "cooldown_seconds")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_LEASED_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FREE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    config: NetworkConfig
    subnets: _containers.RepeatedCompositeFieldContainer[SubnetUsage]
    subnets_leased: int
    subnets_free: int
    addresses_allocated: int
    cooldown_seconds: float
    def __init__(self, config: _Optional[_Union[NetworkConfig, _Mapping]] = ..., subnets: _Optional[_Iterable[_Union[SubnetUsage, _Mapping]]] = ..., subnets_leased: _Optional[int] = ..., subnets_free: _Optional[int] = ..., addresses_allocated: _Optional[int] = ..., cooldown_seconds: _Optional[float] = ...) -> None: ...

class FixedBinding(_message.Message):
    __slots__ = ("ip", "pod", "pod_namespace", "pod_name", "state", "source", "node", "pod_uid", "container_id", "handle", "host_veth", "since", "released_at", "retain_seconds", "retained_until", "reserved_by", "reserved_at")
    IP_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    HOST_VETH_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_AT_FIELD_NUMBER: _ClassVar[int]
    RETAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BY_FIELD_NUMBER: _ClassVar[int]
    RESERVED_AT_FIELD_NUMBER: _ClassVar[int]
    ip: str
    pod: str
    pod_namespace: str
    pod_name: str
    state: str
    source: str
    node: str
    pod_uid: str
    container_id: str
    handle: Handle
    host_veth: str
    since: float
    released_at: float
    retain_seconds: float
    retained_until: float
    reserved_by: str
    reserved_at: float
    def __init__(self, ip: _Optional[str] = ..., pod: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., state: _Optional[str] = ..., source: _Optional[str] = ..., node: _Optional[str] = ..., pod_uid: _Optional[str] = ..., container_id: _Optional[str] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ..., host_veth: _Optional[str] = ..., since: _Optional[float] = ..., released_at: _Optional[float] = ..., retain_seconds: _Optional[float] = ..., retained_until: _Optional[float] = ..., reserved_by: _Optional[str] = ..., reserved_at: _Optional[float] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("pod", "ip")
    POD_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    pod: str
    ip: str
    def __init__(self, pod: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("binding",)
    BINDING_FIELD_NUMBER: _ClassVar[int]
    binding: FixedBinding
    def __init__(self, binding: _Optional[_Union[FixedBinding, _Mapping]] = ...) -> None: ...

class UnreserveRequest(_message.Message):
    __slots__ = ("ip", "pod")
    IP_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    ip: str
    pod: str
    def __init__(self, ip: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class UnreserveResponse(_message.Message):
    __slots__ = ("binding", "cooldown_seconds")
    BINDING_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    binding: FixedBinding
    cooldown_seconds: float
    def __init__(self, binding: _Optional[_Union[FixedBinding, _Mapping]] = ..., cooldown_seconds: _Optional[float] = ...) -> None: ...

class ListFixedRequest(_message.Message):
    __slots__ = ("node", "pod_namespace", "pod_name", "source", "state")
    NODE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node: str
    pod_namespace: str
    pod_name: str
    source: str
    state: str
    def __init__(self, node: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class ListFixedResponse(_message.Message):
    __slots__ = ("bindings",)
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    bindings: _containers.RepeatedCompositeFieldContainer[FixedBinding]
    def __init__(self, bindings: _Optional[_Iterable[_Union[FixedBinding, _Mapping]]] = ...) -> None: ...

class StickyRule(_message.Message):
    __slots__ = ("name", "namespace", "pod_regex", "retain_seconds", "created_by", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_REGEX_FIELD_NUMBER: _ClassVar[int]
    RETAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    pod_regex: str
    retain_seconds: float
    created_by: str
    created_at: float
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_regex: _Optional[str] = ..., retain_seconds: _Optional[float] = ..., created_by: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class StickyAddRequest(_message.Message):
    __slots__ = ("namespace", "pod_regex", "retain_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_REGEX_FIELD_NUMBER: _ClassVar[int]
    RETAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod_regex: str
    retain_seconds: float
    def __init__(self, namespace: _Optional[str] = ..., pod_regex: _Optional[str] = ..., retain_seconds: _Optional[float] = ...) -> None: ...

class StickyAddResponse(_message.Message):
    __slots__ = ("rule", "created")
    RULE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    rule: StickyRule
    created: bool
    def __init__(self, rule: _Optional[_Union[StickyRule, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class StickyListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StickyListResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[StickyRule]
    def __init__(self, rules: _Optional[_Iterable[_Union[StickyRule, _Mapping]]] = ...) -> None: ...

class StickyRemoveRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StickyRemoveResponse(_message.Message):
    __slots__ = ("rule",)
    RULE_FIELD_NUMBER: _ClassVar[int]
    rule: StickyRule
    def __init__(self, rule: _Optional[_Union[StickyRule, _Mapping]] = ...) -> None: ...

class AddressConflict(_message.Message):
    __slots__ = ("ip", "mac", "node", "since", "network")
    IP_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ip: str
    mac: str
    node: str
    since: float
    network: str
    def __init__(self, ip: _Optional[str] = ..., mac: _Optional[str] = ..., node: _Optional[str] = ..., since: _Optional[float] = ..., network: _Optional[str] = ...) -> None: ...

class ListConflictsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConflictsResponse(_message.Message):
    __slots__ = ("conflicts",)
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    conflicts: _containers.RepeatedCompositeFieldContainer[AddressConflict]
    def __init__(self, conflicts: _Optional[_Iterable[_Union[AddressConflict, _Mapping]]] = ...) -> None: ...

class ClearConflictRequest(_message.Message):
    __slots__ = ("ip",)
    IP_FIELD_NUMBER: _ClassVar[int]
    ip: str
    def __init__(self, ip: _Optional[str] = ...) -> None: ...

class ClearConflictResponse(_message.Message):
    __slots__ = ("conflict",)
    CONFLICT_FIELD_NUMBER: _ClassVar[int]
    conflict: AddressConflict
    def __init__(self, conflict: _Optional[_Union[AddressConflict, _Mapping]] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("daemon_version", "schema_version", "schema_supported")
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    daemon_version: str
    schema_version: int
    schema_supported: int
    def __init__(self, daemon_version: _Optional[str] = ..., schema_version: _Optional[int] = ..., schema_supported: _Optional[int] = ...) -> None: ...

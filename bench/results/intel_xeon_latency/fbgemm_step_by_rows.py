import torch, time, resource, sys
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
T,R,D,B=11,int(sys.argv[1]),64,4096
tbe=SplitTableBatchedEmbeddingBagsCodegen([(R,D,EmbeddingLocation.HOST,ComputeDevice.CPU)]*T, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01)
g=torch.Generator().manual_seed(0)
ids=(torch.rand(T*B,generator=g)**4*R).long()
offsets=torch.arange(T*B+1)
gr=torch.randn(B,T*D)
for _ in range(3):
    out=tbe(ids,offsets); out.backward(gr)
r0=resource.getrusage(resource.RUSAGE_SELF)
tf=tb=0
for _ in range(int(sys.argv[2]) if len(sys.argv)>2 else 10):
    t=time.perf_counter(); out=tbe(ids,offsets); t1=time.perf_counter(); out.backward(gr); t2=time.perf_counter()
    tf+=t1-t; tb+=t2-t1
r1=resource.getrusage(resource.RUSAGE_SELF)
print(f"R={R} fwd {tf/(int(sys.argv[2]) if len(sys.argv)>2 else 10)*1e3:.2f} ms bwd {tb/(int(sys.argv[2]) if len(sys.argv)>2 else 10)*1e3:.2f} ms minflt/step {(r1.ru_minflt-r0.ru_minflt)/(int(sys.argv[2]) if len(sys.argv)>2 else 10):.0f} sys {(r1.ru_stime-r0.ru_stime)/(int(sys.argv[2]) if len(sys.argv)>2 else 10)*1e3:.1f} ms/step")

"""Hand-written cells that exercise the compiler: the LSTM/GRU family, peephole and layer norm,
attention over a Context (dot-product, additive, two heads), embeddings with dropout, a
MuFuRu-like softmax over composition ops."""
import torch, seqgraph as sg
def lstm_ops(I=3,H=5):
    x=sg.Input(I,name="x"); h=sg.State(H,name="h"); c=sg.State(H,name="c")
    ih=sg.Linear(I,4*H,name="ih"); hh=sg.Linear(H,4*H,name="hh")
    i,f,g,o=sg.chunk(ih(x)+hh(h),4)
    c2=sg.sigmoid(f)*c+sg.sigmoid(i)*sg.tanh(g); h2=sg.sigmoid(o)*sg.tanh(c2)
    return sg.Cell([x],{h:h2,c:c2},[h2])
def gru(I=3,H=5,after=True):
    x=sg.Input(I,name="x"); h=sg.State(H,name="h")
    gi=sg.Linear(I,3*H)(x)
    xr,xz,xn=sg.chunk(gi,3)
    if after:
        hr,hz,hn=sg.chunk(sg.Linear(H,3*H)(h),3)
        r=sg.sigmoid(xr+hr); z=sg.sigmoid(xz+hz); n=sg.tanh(xn+r*hn)
    else:
        hr,hz=sg.chunk(sg.Linear(H,2*H)(h),2)
        r=sg.sigmoid(xr+hr); z=sg.sigmoid(xz+hz); n=sg.tanh(xn+sg.Linear(H,H)(r*h))
    h2=(1-z)*n+z*h
    return sg.Cell([x],{h:h2},[h2])
def peephole_ln(I=3,H=5):
    x=sg.Input(I,name="x"); h=sg.State(H,name="h",init="learned"); c=sg.State(H,name="c")
    gates=[]
    for k in range(4):
        gates.append(sg.Linear(I,H)(x)+sg.Linear(H,H,bias=False)(h))
    wci=sg.Parameter(H,name="wci"); wcf=sg.Parameter(H,name="wcf")
    i=sg.sigmoid(gates[0]+wci*c); f=sg.sigmoid(gates[1]+wcf*c)
    c2=f*c+i*sg.tanh(sg.LayerNorm(H)(gates[2]))
    o=sg.sigmoid(gates[3])
    h2=o*sg.tanh(sg.layer_norm(c2))
    return sg.Cell([x],{h:h2,c:c2},[h2, sg.softmax(h2)*2])
def attention(I=3,H=5,S=4,D=6):
    x=sg.Input(I,name="x"); h=sg.State(H,name="h")
    mem=sg.Context((S,D),name="memory"); mlen=sg.Context((S,),name="memmask")
    q=sg.Linear(H,D)(h)
    scores=sg.squeeze(sg.matmul(mem, sg.unsqueeze(q,-1)),-1)
    scores=scores+ (mlen-1.0)*1e4
    a=sg.softmax(scores)
    ctx=sg.sum(mem*sg.unsqueeze(a,-1),dim=0)
    h2=sg.tanh(sg.Linear(I+D+H,H)(sg.concat([x,ctx,h])))
    return sg.Cell([x],{h:h2},[h2,a])
def additive_attention(I=3,H=5,S=4,D=6,A=4):
    """Bahdanau's attention: the scores come from tanh over (S, A) per-example values."""
    x=sg.Input(I,name="x"); h=sg.State(H,name="h")
    mem=sg.Context((S,D),name="memory"); mlen=sg.Context((S,),name="memmask")
    keys=sg.Linear(D,A,bias=False,name="keys")(mem)
    q=sg.Linear(H,A,name="query")(h)
    e=sg.Linear(A,1,bias=False,name="v")(sg.tanh(keys+sg.unsqueeze(q,0)))
    a=sg.softmax(sg.squeeze(e,-1)+(mlen-1.0)*1e4)
    ctx=sg.sum(mem*sg.unsqueeze(a,-1),dim=0)
    h2=sg.tanh(sg.Linear(I+D+H,H)(sg.concat([x,ctx,h])))
    return sg.Cell([x],{h:h2},[h2,a])
def multihead_attention(I=3,H=5,S=4,D=6,heads=2):
    """Two heads: (heads, D) queries times the memory, a (heads, S) softmax along its last dim
    and products of two per-example matrices (strided_matmul and softmax_groups in the C loops)."""
    x=sg.Input(I,name="x"); h=sg.State(H,name="h")
    mem=sg.Context((S,D),name="memory"); mlen=sg.Context((S,),name="memmask")
    q=sg.reshape(sg.Linear(H,heads*D,name="query")(h),(heads,D))
    a=sg.softmax(sg.matmul(q,sg.transpose(mem))+(mlen-1.0)*1e4)
    ctx=sg.reshape(sg.matmul(a,mem),(heads*D,))
    h2=sg.tanh(sg.Linear(I+heads*D+H,H)(sg.concat([x,ctx,h])))
    return sg.Cell([x],{h:h2},[h2,sg.reshape(a,(heads*S,))])
def embed_drop(V=7,E=4,H=5):
    tok=sg.Input((),name="tok",dtype="long"); h=sg.State(H,name="h")
    e=sg.Embedding(V,E,padding_idx=0)(tok)
    e=sg.dropout(e,0.3)
    hd=sg.dropout(h,0.2,per_sequence=True)
    h2=sg.tanh(sg.Linear(E,H)(e)+sg.Linear(H,H)(hd))
    return sg.Cell([tok],{h:h2},[h2, sg.relu(e)])
def mufuru_like(I=3,H=4):
    x=sg.Input(I,name="x"); s=sg.State(H,name="s")
    r=sg.sigmoid(sg.Linear(I,H)(x)+sg.Linear(H,H)(s))
    v=sg.tanh(sg.Linear(I,H)(x)+sg.Linear(H,H)(s*r))
    p=sg.Linear(I,3*H)(x)+sg.Linear(H,3*H)(s)
    p1,p2,p3=sg.chunk(p,3)
    m=sg.maximum(sg.maximum(p1,p2),p3)
    e1,e2,e3=sg.exp(p1-m),sg.exp(p2-m),sg.exp(p3-m)
    tot=e1+e2+e3
    s2=(e1*s+e2*v+e3*sg.sqrt(sg.abs(s-v)+1e-3)*0.25)/tot + sg.minimum(s,v)*0.1
    return sg.Cell([x],{s:s2},[s2])
def mlstm(I=3,D=3):
    """xLSTM's mLSTM: a (D, D) matrix memory C updated by the outer product v k^T, a normaliser
    state n, and the read C q over |n . q| (a matrix state, carried as a flat row)."""
    x=sg.Input(I,name="x"); C=sg.State((D,D),name="C"); n=sg.State(D,name="n")
    k=sg.Linear(I,D,name="k")(x); v=sg.Linear(I,D,name="v")(x); q=sg.Linear(I,D,name="q")(x)
    f=sg.sigmoid(sg.Linear(I,1,name="f")(x)); i=sg.sigmoid(sg.Linear(I,1,name="i")(x))
    C2=sg.unsqueeze(f,-1)*C+sg.unsqueeze(i,-1)*sg.matmul(sg.unsqueeze(v,-1),sg.unsqueeze(k,0))
    n2=f*n+i*k
    h=sg.reshape(sg.matmul(C2,sg.unsqueeze(q,-1)),(D,))/(sg.abs(sg.sum(n2*q,dim=-1,keepdim=True))+1.0)
    return sg.Cell([x],{C:C2,n:n2},[h])
def delta_rule(I=3,D=4):
    """DeltaNet's delta rule, C + beta (v - C k) k^T with k normalised: the matrix state times a
    vector, and an outer product of a step value, inside the loop; the memory is an output too."""
    x=sg.Input(I,name="x"); C=sg.State((D,D),name="C")
    k=sg.Linear(I,D,name="k")(x); k=k/sg.sqrt(sg.sum(k*k,dim=-1,keepdim=True)+1.0)
    v=sg.Linear(I,D,name="v")(x); beta=sg.sigmoid(sg.Linear(I,1,name="beta")(x))
    err=v-sg.reshape(sg.matmul(C,sg.unsqueeze(k,-1)),(D,))
    C2=C+sg.matmul(sg.unsqueeze(beta*err,-1),sg.unsqueeze(k,0))
    h=sg.tanh(sg.reshape(sg.matmul(C2,sg.unsqueeze(v,-1)),(D,)))
    return sg.Cell([x],{C:C2},[h,C2])


ZOO = {
    "lstm_ops": lstm_ops,
    "gru_reset_after": lambda: gru(after=True),
    "gru_reset_before": lambda: gru(after=False),
    "peephole_ln": peephole_ln,
    "attention": attention,
    "additive_attention": additive_attention,
    "multihead_attention": multihead_attention,
    "embed_drop": embed_drop,
    "mufuru_like": mufuru_like,
    "mlstm": mlstm,
    "delta_rule": delta_rule,
}


def make_inputs(cell, T, B, dtype=torch.float64, requires_grad=True):
    """Random per-step inputs (and contexts) for a zoo cell."""
    xs = []
    for n in cell.inputs:
        if n.dtype == "long":
            xs.append(torch.randint(0, 7, (T, B) + n.shape))
        else:
            xs.append(torch.randn((T, B) + n.shape, dtype=dtype, requires_grad=requires_grad))
    ctx = None
    if cell.contexts:  # a "memmask" keeps the first 1..S rows of its memory; other contexts are random
        ctx = {}
        for c in cell.contexts:
            if c.name == "memmask":
                S = c.shape[0]
                ctx[c.name] = (torch.arange(S).unsqueeze(0) < torch.randint(1, S + 1, (B, 1))).to(dtype)
            else:
                ctx[c.name] = torch.randn((B,) + c.shape, dtype=dtype, requires_grad=requires_grad)
    return xs, ctx

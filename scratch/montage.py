import json, sys, cv2, numpy as np
root=sys.argv[1]; d=json.load(open(f"{root}/annotations/instances_val.json"))
cats={c["id"]:c["name"] for c in d["categories"]}
tiles=[]
for img in d["images"][:8]:
    im=cv2.imread(f"{root}/val/{img['file_name']}")
    im=cv2.resize(im,None,fx=2,fy=2,interpolation=cv2.INTER_NEAREST)
    for a in d["annotations"]:
        if a["image_id"]==img["id"]:
            x,y,w,h=[2*v for v in a["bbox"]]
            cv2.rectangle(im,(int(x),int(y)),(int(x+w),int(y+h)),(0,255,0),1)
            cv2.putText(im,cats[a["category_id"]],(int(x),int(y)+10),cv2.FONT_HERSHEY_SIMPLEX,0.35,(255,255,255),1)
    canvas=np.zeros((320,320,3),np.uint8); canvas[:im.shape[0],:im.shape[1]]=im[:320,:320]; tiles.append(canvas)
rows=[np.hstack(tiles[i:i+4]) for i in (0,4)]
cv2.imwrite(sys.argv[2],np.vstack(rows))

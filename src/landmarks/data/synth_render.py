"""Procedural 3-D scenes and photographs of them, for the synthetic dataset (:mod:`landmarks.data.synth`).

A *landmark* is a small 3-D model built from planar faces in a y-up world (metres): prisms with
procedurally textured facades (window grids, cornices, doors, clocks, rose windows, signs), gable
and pyramid roofs, lathed domes and spires, arch gates with see-through openings, porticos, trees
and neighbouring buildings. A *photograph* is a pinhole camera (yaw, elevation, distance, roll,
field of view, off-centre framing) that projects every face with its exact plane homography
(``cv2.warpPerspective`` of the face texture, near-plane clipping, back-face culling, painter's
order), over a sky and a textured ground plane, with a sun, weather, occluders (people, trees,
cars, poles) and camera effects (exposure, white balance, blur, noise, rescaling, JPEG quality).

Out-of-domain images reuse the same machinery: indoor rooms (the camera inside a box), nature,
textures, people, and "near-miss" buildings that belong to no landmark of the set.

Everything is a pure function of a ``numpy.random.Generator``: the same generator state gives the
same pixels. Nothing here touches global state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

Rng = np.random.Generator

#: Texture pixels per metre of facade.
PPM = 9.0
#: Longest side of a face texture, in pixels.
MAX_TEX_PX = 320
_UP = np.array([0.0, 1.0, 0.0])

# Colour pools shared by every landmark (RGB): landmarks differ by structure and detail, not palette.
WALLS = np.array(
    [
        (222, 208, 180),
        (200, 190, 175),
        (170, 92, 72),
        (236, 232, 224),
        (150, 150, 148),
        (206, 172, 122),
        (190, 140, 110),
        (122, 112, 102),
        (226, 214, 160),
        (180, 190, 196),
        (160, 174, 150),
        (214, 196, 196),
    ],
    np.float32,
)
TRIMS = np.array(
    [
        (240, 238, 230),
        (200, 196, 186),
        (120, 110, 100),
        (230, 220, 190),
        (90, 80, 75),
        (180, 170, 150),
    ],
    np.float32,
)
ROOFS = np.array(
    [
        (92, 62, 52),
        (160, 72, 52),
        (72, 80, 92),
        (92, 142, 122),
        (206, 172, 82),
        (62, 62, 66),
        (142, 142, 152),
        (120, 40, 36),
    ],
    np.float32,
)
GLASS = np.array(
    [(60, 80, 100), (40, 50, 62), (82, 112, 132), (30, 40, 50), (102, 132, 142), (70, 64, 58)], np.float32
)
ACCENTS = np.array(
    [
        (180, 30, 30),
        (30, 60, 150),
        (220, 180, 40),
        (30, 120, 60),
        (120, 40, 120),
        (230, 120, 30),
        (20, 20, 20),
        (240, 240, 240),
        (60, 160, 200),
        (200, 60, 100),
    ],
    np.float32,
)
SKIN = np.array([(250, 214, 180), (226, 178, 140), (190, 136, 100), (140, 96, 66), (96, 64, 44)], np.float32)


def _pick(rng: Rng, pool: np.ndarray, jitter: float = 12.0) -> np.ndarray:
    """A colour from ``pool`` with a little jitter, float32 RGB in [0, 255]."""
    c = pool[rng.integers(len(pool))] + rng.normal(0.0, jitter, 3)
    return np.clip(c, 0, 255).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    n = math.sqrt(float(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))
    return v / n if n > 1e-12 else v


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (much cheaper than ``np.cross`` for single vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


# --------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------


@dataclass
class TexFace:
    """A textured planar quad: ``origin`` is the texture's top-left corner, ``u``/``v`` span its width/height.

    The face's normal is ``v × u`` (seen from that side, ``u`` points right and ``v`` down, so the
    texture is not mirrored). ``tile_m`` set: the texture repeats every ``tile_m`` metres (ground, floors).
    """

    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    tex: int
    double_sided: bool = False
    tile_m: float | None = None
    #: not shaded by the light (lamps, screens)
    emissive: bool = False
    #: a sprite standing at ``origin`` that turns to face the camera (see :func:`orient_billboards`)
    billboard: bool = False
    normal: np.ndarray = field(init=False, repr=False)
    center: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.normal = _unit(_cross(self.v, self.u))
        self.center = self.origin + 0.5 * self.u + 0.5 * self.v


@dataclass
class FlatFace:
    """A flat-coloured convex polygon ``verts`` (N, 3) with outward ``normal``."""

    verts: np.ndarray
    color: np.ndarray
    normal: np.ndarray
    double_sided: bool = False
    center: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.center = self.verts.mean(axis=0)


@dataclass
class Scene:
    """Faces and textures of one 3-D scene, plus what a camera needs to frame it."""

    faces: list[TexFace | FlatFace] = field(default_factory=list)
    textures: list[np.ndarray] = field(default_factory=list)
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    radius: float = 10.0
    height: float = 10.0
    ground_tex: int = -1
    ground_tile_m: float = 4.0
    #: points on the structure worth a close-up (partial views)
    details: list[np.ndarray] = field(default_factory=list)
    #: solid volumes (base polygon (N, 2) in x-z, y0, y1) a camera must stay out of
    solids: list[tuple[np.ndarray, float, float]] = field(default_factory=list)

    def add_texture(self, tex: np.ndarray) -> int:
        """Register an RGBA uint8 texture; returns its index."""
        self.textures.append(tex)
        return len(self.textures) - 1


# --------------------------------------------------------------------------------------------------
# Camera and rasterisation
# --------------------------------------------------------------------------------------------------


@dataclass
class Camera:
    """A pinhole camera: world->camera rotation ``R`` (3, 3) (rows x right, y down, z forward), centre ``C``, ``K``."""

    R: np.ndarray
    C: np.ndarray
    K: np.ndarray
    width: int
    height: int
    near: float = 0.05

    @property
    def forward(self) -> np.ndarray:
        """Viewing direction in world coordinates."""
        return self.R[2]

    def to_cam(self, pts: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> camera coordinates (N, 3)."""
        return (pts - self.C) @ self.R.T

    def project_cam(self, pc: np.ndarray) -> np.ndarray:
        """Camera points (N, 3), z > 0 -> pixels (N, 2)."""
        p = pc @ self.K.T
        return p[:, :2] / p[:, 2:3]


def look_at(
    C: np.ndarray,
    target: np.ndarray,
    width: int,
    height: int,
    hfov_deg: float,
    roll_deg: float = 0.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
) -> Camera:
    """A camera at ``C`` looking at ``target``; ``hfov_deg`` spans the longer image side."""
    f = _unit(np.asarray(target, float) - np.asarray(C, float))
    x = _cross(f, _UP)
    if np.linalg.norm(x) < 1e-6:
        x = np.array([1.0, 0.0, 0.0])
    x = _unit(x)
    y = _cross(f, x)
    R = np.stack([x, y, f])
    r = math.radians(roll_deg)
    Rz = np.array([[math.cos(r), -math.sin(r), 0.0], [math.sin(r), math.cos(r), 0.0], [0.0, 0.0, 1.0]])
    R = Rz @ R
    focal = 0.5 * max(width, height) / math.tan(math.radians(hfov_deg) / 2)
    K = np.array(
        [[focal, 0.0, width / 2 + offset_px[0]], [0.0, focal, height / 2 + offset_px[1]], [0.0, 0.0, 1.0]]
    )
    return Camera(R=R, C=np.asarray(C, float), K=K, width=width, height=height)


def _clip_halfspace(poly: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """Clip a convex polygon (N, 3) to ``plane[:3] @ p + plane[3] >= 0`` (Sutherland-Hodgman)."""
    d = poly @ plane[:3] + plane[3]
    if (d >= 0).all():
        return poly
    out = []
    n = len(poly)
    for i in range(n):
        j = (i + 1) % n
        if d[i] >= 0:
            out.append(poly[i])
        if (d[i] >= 0) != (d[j] >= 0):
            t = d[i] / (d[i] - d[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.array(out) if out else np.zeros((0, 3))


def _clip_frustum(cam: Camera, pc: np.ndarray, margin_px: float = 8.0) -> np.ndarray:
    """Clip a convex polygon in camera coordinates (N, 3) to the near plane and the image borders
    (with a margin), so that its projection stays in a small range around the image."""
    fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
    m = margin_px
    if (pc[:, 2] >= cam.near).all():
        px = cam.project_cam(pc)
        if (
            (px[:, 0] >= -m).all()
            and (px[:, 0] <= cam.width + m).all()
            and (px[:, 1] >= -m).all()
            and (px[:, 1] <= cam.height + m).all()
        ):
            return pc
    planes = (
        np.array([0.0, 0.0, 1.0, -cam.near]),
        np.array([fx, 0.0, cx + m, 0.0]),  # x_px >= -m
        np.array([-fx, 0.0, cam.width + m - cx, 0.0]),  # x_px <= W + m
        np.array([0.0, fy, cy + m, 0.0]),
        np.array([0.0, -fy, cam.height + m - cy, 0.0]),
    )
    for plane in planes:
        pc = _clip_halfspace(pc, plane)
        if len(pc) < 3:
            return np.zeros((0, 3))
    return pc


def _bbox(poly: np.ndarray, w: int, h: int) -> tuple[int, int, int, int] | None:
    x0 = max(0, int(math.floor(poly[:, 0].min())))
    y0 = max(0, int(math.floor(poly[:, 1].min())))
    x1 = min(w, int(math.ceil(poly[:, 0].max())) + 1)
    y1 = min(h, int(math.ceil(poly[:, 1].max())) + 1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1, y1


def _poly_mask(poly: np.ndarray, x0: int, y0: int, bw: int, bh: int) -> np.ndarray:
    """Anti-aliased uint8 mask (bh, bw) of a convex polygon given in canvas pixels."""
    mask = np.zeros((bh, bw), np.uint8)
    pts = np.round((poly - (x0, y0)) * 16).astype(np.int32)
    cv2.fillConvexPoly(mask, pts, 255, cv2.LINE_AA, 4)
    return mask


def _composite(
    canvas: np.ndarray, box: tuple[int, int, int, int], rgb: np.ndarray, alpha_u8: np.ndarray
) -> None:
    """``canvas[box] = canvas[box] * (1 - a) + rgb * a`` with ``a = alpha_u8 / 255``; ``rgb`` may be a colour (3,)."""
    x0, y0, x1, y1 = box
    a = alpha_u8.astype(np.float32)
    a *= np.float32(1.0 / 255.0)
    region = canvas[y0:y1, x0:x1]
    diff = rgb - region
    diff *= a[..., None]
    region += diff


@dataclass
class Lighting:
    """Sun direction (towards the sun), and per-channel ambient and direct light."""

    sun: np.ndarray
    ambient: np.ndarray
    direct: np.ndarray

    def shade(self, normal: np.ndarray) -> np.ndarray:
        """(3,) multiplier for a surface with this normal."""
        d = max(0.0, float(normal @ self.sun))
        sky = 0.85 + 0.15 * float(normal[1])  # faces looking up see more sky
        return (self.ambient * sky + self.direct * d).astype(np.float32)


def draw_tex_face(canvas: np.ndarray, cam: Camera, face: TexFace, tex: np.ndarray, shade: np.ndarray) -> None:
    """Project a textured quad into ``canvas`` ((H, W, 3) float32) with its plane homography."""
    th, tw = tex.shape[:2]
    corners = np.stack(
        [face.origin, face.origin + face.u, face.origin + face.u + face.v, face.origin + face.v]
    )
    pc = cam.to_cam(corners)
    if (pc[:, 2] < cam.near).all():
        return
    clipped = (pc[:, 2] < cam.near).any()
    pc = _clip_frustum(cam, pc)
    if len(pc) < 3:
        return
    poly = cam.project_cam(pc)
    box = _bbox(poly, cam.width, cam.height)
    if box is None:
        return
    x0, y0, x1, y1 = box
    if face.tile_m is not None:
        su = face.tile_m / tw
        sv = face.tile_m / th
        cu, cv_ = _unit(face.u) * su, _unit(face.v) * sv
    else:
        cu, cv_ = face.u / tw, face.v / th
    M = np.stack([cam.R @ cu, cam.R @ cv_, cam.R @ (face.origin - cam.C)], axis=1)
    H = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]]) @ cam.K @ M
    bw, bh = x1 - x0, y1 - y0
    border = cv2.BORDER_WRAP if face.tile_m is not None else cv2.BORDER_CONSTANT
    try:
        warped = cv2.warpPerspective(
            tex, H, (bw, bh), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
        )
    except cv2.error:  # pragma: no cover (degenerate homography)
        return
    alpha = warped[..., 3]
    if clipped or face.tile_m is not None:
        alpha = (alpha.astype(np.uint16) * _poly_mask(poly, x0, y0, bw, bh) // 255).astype(np.uint8)
    rgb = warped[..., :3].astype(np.float32)
    if not face.emissive:
        rgb *= shade
    _composite(canvas, box, rgb, alpha)


def draw_flat_face(canvas: np.ndarray, cam: Camera, face: FlatFace, color: np.ndarray) -> None:
    """Project a flat-coloured convex polygon into ``canvas`` ((H, W, 3) float32), anti-aliased."""
    pc = cam.to_cam(face.verts)
    if (pc[:, 2] < cam.near).all():
        return
    pc = _clip_frustum(cam, pc)
    if len(pc) < 3:
        return
    poly = cam.project_cam(pc)
    box = _bbox(poly, cam.width, cam.height)
    if box is None:
        return
    x0, y0, x1, y1 = box
    mask = _poly_mask(poly, x0, y0, x1 - x0, y1 - y0)
    _composite(canvas, box, color.astype(np.float32), mask)


def render_faces(
    canvas: np.ndarray,
    cam: Camera,
    faces: list[TexFace | FlatFace],
    textures: list[np.ndarray],
    light: Lighting,
) -> None:
    """Draw ``faces`` far to near (painter's order), culling faces seen from behind."""
    todo: list[tuple[float, int, TexFace | FlatFace, np.ndarray]] = []
    for face in faces:
        n = face.normal
        to_cam = cam.C - face.center
        facing = float(n @ to_cam)
        if facing <= 0:
            if not face.double_sided:
                continue
            n = -n
        depth = float(to_cam @ to_cam)
        todo.append((depth, len(todo), face, n))
    todo.sort(key=lambda t: (-t[0], t[1]))
    for _, _, face, n in todo:
        shade = light.shade(n)
        if isinstance(face, FlatFace):
            draw_flat_face(canvas, cam, face, face.color * shade)
        else:
            draw_tex_face(canvas, cam, face, textures[face.tex], shade)


# --------------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------------


def lowfreq(rng: Rng, h: int, w: int, cells: int = 6) -> np.ndarray:
    """Smooth noise (h, w) float32 of about unit variance with ``cells`` features across the longer side."""
    s = max(h, w)
    gy = max(2, round(cells * h / s) + 1)
    gx = max(2, round(cells * w / s) + 1)
    small = rng.standard_normal((gy, gx)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def fractal(rng: Rng, h: int, w: int, octaves: int = 4, base_cells: int = 4) -> np.ndarray:
    """Multi-octave smooth noise (h, w) float32, roughly in [-1.5, 1.5]."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for o in range(octaves):
        out += amp * lowfreq(rng, h, w, base_cells * 2**o)
        amp *= 0.5
    return out * 0.6


def _rgba(img: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    img = np.clip(img, 0, 255).astype(np.uint8)
    a = np.full(img.shape[:2], 255, np.uint8) if alpha is None else alpha
    return np.dstack([img, a])


def _glyphs(
    img: np.ndarray,
    rng: Rng,
    x: float,
    y: float,
    w: float,
    h: float,
    color: np.ndarray,
    n: int | None = None,
    thickness: int = 1,
) -> None:
    """Write a row of random glyph-like strokes in the box (x, y, w, h)."""
    n = n if n is not None else max(1, int(w / max(2.0, h * 0.7)))
    cw = w / n
    col = tuple(float(c) for c in color)
    for i in range(n):
        gx = x + i * cw + 0.15 * cw
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(2, 5))
            pts = np.stack([gx + rng.uniform(0, 0.7 * cw, k), y + 0.1 * h + rng.uniform(0, 0.8 * h, k)], 1)
            cv2.polylines(img, [np.round(pts * 4).astype(np.int32)], False, col, thickness, cv2.LINE_AA, 2)


def _sign(img: np.ndarray, rng: Rng, x: float, y: float, w: float, h: float, style: FacadeStyle) -> None:
    """A plate with glyphs (shop sign, inscription)."""
    plate = _pick(rng, ACCENTS, 20) if rng.random() < 0.6 else style.trim * 0.6
    ink = np.full(3, 245.0) if plate.mean() < 120 else np.full(3, 25.0)
    if rng.random() < 0.3:
        ink = _pick(rng, ACCENTS, 10)
    p0 = (round(x), round(y))
    p1 = (round(x + w), round(y + h))
    cv2.rectangle(img, p0, p1, tuple(float(c) for c in plate), -1)
    cv2.rectangle(img, p0, p1, tuple(float(c) for c in plate * 0.6), 1)
    _glyphs(img, rng, x + 0.05 * w, y + 0.1 * h, 0.9 * w, 0.8 * h, ink, thickness=1 if h < 14 else 2)


def _emblem(img: np.ndarray, rng: Rng, cx: float, cy: float, r: float, style: FacadeStyle) -> None:
    """A distinctive ornament: rose window, clock, coat of arms or mosaic."""
    kind = style.emblem
    c = (round(cx * 4), round(cy * 4))
    R = max(2, round(r * 4))
    trim = tuple(float(v) for v in style.trim)
    if kind == "rose":
        cv2.circle(img, c, R, trim, -1, cv2.LINE_AA, 2)
        cv2.circle(img, c, round(R * 0.85), tuple(float(v) for v in style.glass * 0.8), -1, cv2.LINE_AA, 2)
        spokes = style.spokes
        for k in range(spokes):
            a = 2 * math.pi * k / spokes
            p = (round(c[0] + R * 0.85 * math.cos(a)), round(c[1] + R * 0.85 * math.sin(a)))
            cv2.line(img, c, p, trim, max(1, round(r / 8)), cv2.LINE_AA, 2)
        for k in range(spokes):
            a = 2 * math.pi * (k + 0.5) / spokes
            p = (round(c[0] + R * 0.6 * math.cos(a)), round(c[1] + R * 0.6 * math.sin(a)))
            cv2.circle(
                img, p, max(1, round(R * 0.12)), tuple(float(v) for v in style.accent), -1, cv2.LINE_AA, 2
            )
        cv2.circle(img, c, round(R * 0.25), tuple(float(v) for v in style.accent), -1, cv2.LINE_AA, 2)
    elif kind == "clock":
        cv2.circle(img, c, R, tuple(float(v) for v in style.accent * 0.7), -1, cv2.LINE_AA, 2)
        cv2.circle(img, c, round(R * 0.85), (238.0, 234.0, 220.0), -1, cv2.LINE_AA, 2)
        for k in range(12):
            a = 2 * math.pi * k / 12
            p0 = (round(c[0] + R * 0.7 * math.cos(a)), round(c[1] + R * 0.7 * math.sin(a)))
            p1 = (round(c[0] + R * 0.82 * math.cos(a)), round(c[1] + R * 0.82 * math.sin(a)))
            cv2.line(img, p0, p1, (20.0, 20.0, 20.0), 1, cv2.LINE_AA, 2)
        for ang, ln in ((style.clock_hands[0], 0.45), (style.clock_hands[1], 0.7)):
            p = (round(c[0] + R * ln * math.cos(ang)), round(c[1] + R * ln * math.sin(ang)))
            cv2.line(img, c, p, (15.0, 15.0, 15.0), max(1, round(r / 10)), cv2.LINE_AA, 2)
    elif kind == "arms":
        w = R
        pts = np.array(
            [
                [c[0] - w, c[1] - w],
                [c[0] + w, c[1] - w],
                [c[0] + w, c[1] + w // 3],
                [c[0], c[1] + w],
                [c[0] - w, c[1] + w // 3],
            ],
            np.int32,
        )
        cv2.fillConvexPoly(img, pts, tuple(float(v) for v in style.accent), cv2.LINE_AA, 2)
        cv2.polylines(img, [pts], True, trim, max(1, round(r / 6)), cv2.LINE_AA, 2)
        cv2.line(
            img,
            (c[0], c[1] - w),
            (c[0], c[1] + w),
            tuple(float(v) for v in style.accent2),
            max(1, R // 5),
            cv2.LINE_AA,
            2,
        )
        cv2.line(
            img,
            (c[0] - w, c[1] - w // 3),
            (c[0] + w, c[1] - w // 3),
            tuple(float(v) for v in style.accent2),
            max(1, R // 5),
            cv2.LINE_AA,
            2,
        )
    else:  # mosaic
        n = 5
        s = 2 * r / n
        for i in range(n):
            for j in range(n):
                col = style.mosaic[(i * n + j) % len(style.mosaic)]
                p0 = (round((cx - r + j * s) * 4), round((cy - r + i * s) * 4))
                p1 = (round((cx - r + (j + 1) * s) * 4) - 1, round((cy - r + (i + 1) * s) * 4) - 1)
                cv2.rectangle(img, p0, p1, tuple(float(v) for v in col), -1, cv2.LINE_AA, 2)


@dataclass
class FacadeStyle:
    """The look shared by every facade of one building (chosen once per landmark)."""

    wall: np.ndarray
    wall2: np.ndarray
    trim: np.ndarray
    glass: np.ndarray
    accent: np.ndarray
    accent2: np.ndarray
    roof: np.ndarray
    material: str
    floor_h: float
    col_w: float
    win_w: float
    win_h: float
    win_shape: str
    cornice_every: int
    shutters: np.ndarray | None
    lit_prob: float
    missing_prob: float
    pilasters: bool
    plinth_h: float
    stripe_m: float
    emblem: str
    spokes: int
    clock_hands: tuple[float, float]
    mosaic: np.ndarray
    door_arched: bool
    frieze: str | None  # a patterned band in accent colours on every facade (seen from any side)
    frieze_floor: int
    awning: np.ndarray | None  # ground-floor awnings colour


def make_style(rng: Rng, modern: bool | None = None) -> FacadeStyle:
    """A random building style; ``modern`` forces glass/panel facades on or off."""
    modern = bool(rng.random() < 0.2) if modern is None else modern
    material = (
        str(rng.choice(["glass", "panels"]))
        if modern
        else str(rng.choice(["plain", "blocks", "bricks", "stripes", "plain", "blocks"]))
    )
    floor_h = float(rng.uniform(3.6, 4.2)) if modern else float(rng.uniform(3.2, 5.5))
    col_w = float(rng.uniform(2.4, 5.0))
    return FacadeStyle(
        wall=_pick(rng, WALLS),
        wall2=_pick(rng, WALLS),
        trim=_pick(rng, TRIMS),
        glass=_pick(rng, GLASS),
        accent=_pick(rng, ACCENTS, 20),
        accent2=_pick(rng, ACCENTS, 20),
        roof=_pick(rng, ROOFS),
        material=material,
        floor_h=floor_h,
        col_w=col_w,
        win_w=float(rng.uniform(0.3, 0.62)) * col_w,
        win_h=float(rng.uniform(0.42, 0.75)) * floor_h,
        win_shape=str(rng.choice(["rect", "rect", "arch", "round", "slit", "double"])),
        cornice_every=int(rng.integers(0, 4)),
        shutters=_pick(rng, ACCENTS, 25) * 0.7 if rng.random() < 0.25 else None,
        lit_prob=float(rng.uniform(0.0, 0.35)),
        missing_prob=float(rng.uniform(0.0, 0.15)),
        pilasters=bool(rng.random() < 0.35),
        plinth_h=float(rng.uniform(0.0, 4.0)) if rng.random() < 0.6 else 0.0,
        stripe_m=float(rng.uniform(0.6, 2.0)),
        emblem=str(rng.choice(["rose", "clock", "arms", "mosaic"])),
        spokes=int(rng.integers(6, 17)),
        clock_hands=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi))),
        mosaic=np.stack([_pick(rng, ACCENTS, 30) for _ in range(int(rng.integers(3, 7)))]),
        door_arched=bool(rng.random() < 0.6),
        frieze=str(rng.choice(["zigzag", "checker", "dots", "stripes"])) if rng.random() < 0.55 else None,
        frieze_floor=int(rng.integers(1, 4)),
        awning=_pick(rng, ACCENTS, 20) if rng.random() < 0.3 else None,
    )


def _wall_base(rng: Rng, style: FacadeStyle, th: int, tw: int, s: float) -> np.ndarray:
    """The wall material (th, tw, 3) float32 at ``s`` pixels per metre."""
    img = np.empty((th, tw, 3), np.float32)
    img[:] = style.wall
    stain = lowfreq(rng, th, tw, 5) * 0.06 + 1.0
    img *= stain[..., None]
    yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
    if style.material in ("blocks", "bricks"):
        ch = (0.7 if style.material == "blocks" else 0.32) * s
        cw = (1.4 if style.material == "blocks" else 0.7) * s
        course = np.floor(yy / ch)
        bx = np.floor((xx + (course % 2) * cw / 2) / cw)
        table = rng.normal(
            1.0, 0.05 if style.material == "blocks" else 0.09, (int(th / ch) + 2, int(tw / cw) + 3)
        )
        img *= table[course.astype(int), bx.astype(int) % table.shape[1]].astype(np.float32)[..., None]
        joint = ((yy % ch) < 1.0) | (((xx + (course % 2) * cw / 2) % cw) < 1.0)
        img[joint] *= 0.78
    elif style.material == "stripes":
        band = (np.floor(yy / (style.stripe_m * s)) % 2).astype(bool)
        img[band] = style.wall2 * stain[band][:, None]
    elif style.material == "glass":
        grad = (yy / th)[..., None] * 0.35 + 0.8 + 0.15 * np.sin((xx + yy * 0.6) / (tw + 1) * 5)[..., None]
        img[:] = style.glass * grad
        step_x = max(2.0, style.col_w * s / 2)
        step_y = max(2.0, style.floor_h * s)
        grid = ((xx % step_x) < 1.2) | ((yy % step_y) < 1.6)
        img[grid] = style.trim * 0.85
    elif style.material == "panels":
        step_y = max(2.0, style.floor_h * s)
        band = (yy % step_y) > step_y * 0.55
        glass = style.glass * (0.8 + 0.3 * (yy % step_y)[band][:, None] / step_y)
        img[band] = glass
        img[((xx % max(2.0, style.col_w * s)) < 1.0) & band] = style.trim * 0.7
    img += rng.normal(0.0, 3.0, (th, tw, 1)).astype(np.float32)
    return img


def _window(
    img: np.ndarray, rng: Rng, x: float, y: float, w: float, h: float, style: FacadeStyle, shape: str
) -> None:
    """One window with frame (all coordinates in texture pixels, drawn with 2 fractional bits)."""
    glass = style.glass * rng.uniform(0.75, 1.2)
    if rng.random() < style.lit_prob:
        glass = (
            np.clip(np.array([235.0, 215.0, 160.0]) * rng.uniform(0.75, 1.0), 0, 255)
            if rng.random() < 0.5
            else style.trim * 0.9
        )
    g = tuple(float(v) for v in glass)
    t = tuple(float(v) for v in style.trim)
    lw = max(1, round(min(w, h) * 0.08 * 4))

    def q(v: float) -> int:
        return round(v * 4)

    if shape == "round":
        r = min(w, h) / 2
        cv2.circle(img, (q(x + w / 2), q(y + h / 2)), q(r), g, -1, cv2.LINE_AA, 2)
        cv2.circle(img, (q(x + w / 2), q(y + h / 2)), q(r), t, lw, cv2.LINE_AA, 2)
        return
    if shape == "double":
        _window(img, rng, x, y, w * 0.45, h, style, "rect")
        _window(img, rng, x + w * 0.55, y, w * 0.45, h, style, "rect")
        return
    if shape == "slit":
        x, w = x + w * 0.3, w * 0.4
    top = y
    if shape == "arch":
        r = w / 2
        cv2.ellipse(img, (q(x + r), q(y + r)), (q(r), q(r)), 0, 180, 360, g, -1, cv2.LINE_AA, 2)
        cv2.ellipse(img, (q(x + r), q(y + r)), (q(r), q(r)), 0, 180, 360, t, lw, cv2.LINE_AA, 2)
        top = y + r
    cv2.rectangle(img, (q(x), q(top)), (q(x + w), q(y + h)), g, -1, cv2.LINE_AA, 2)
    cv2.rectangle(img, (q(x), q(top)), (q(x + w), q(y + h)), t, lw, cv2.LINE_AA, 2)
    if w > 5 and h > 8:  # glazing bars
        cv2.line(img, (q(x + w / 2), q(top)), (q(x + w / 2), q(y + h)), t, max(1, lw // 2), cv2.LINE_AA, 2)
        cv2.line(
            img,
            (q(x), q(top + (y + h - top) * 0.4)),
            (q(x + w), q(top + (y + h - top) * 0.4)),
            t,
            max(1, lw // 2),
            cv2.LINE_AA,
            2,
        )
    cv2.rectangle(img, (q(x - 0.1 * w), q(y + h)), (q(x + 1.1 * w), q(y + h + max(1.0, 0.05 * h))), t, -1)
    if style.shutters is not None:
        sc = tuple(float(v) for v in style.shutters)
        cv2.rectangle(img, (q(x - 0.45 * w), q(top)), (q(x - 0.05 * w), q(y + h)), sc, -1, cv2.LINE_AA, 2)
        cv2.rectangle(img, (q(x + 1.05 * w), q(top)), (q(x + 1.45 * w), q(y + h)), sc, -1, cv2.LINE_AA, 2)


def _frieze(img: np.ndarray, style: FacadeStyle, y: float, h: float) -> None:
    """A horizontal band patterned in the building's accent colours, its top at ``y`` (pixels)."""
    th, tw = img.shape[:2]
    y0, y1 = max(0, round(y - h)), min(th, round(y))
    if y1 - y0 < 2:
        return
    band = np.empty((y1 - y0, tw, 3), np.float32)
    band[:] = style.accent
    yy, xx = np.mgrid[0 : y1 - y0, 0:tw].astype(np.float32)
    p = float(y1 - y0)
    if style.frieze == "zigzag":
        m = np.abs(((xx / p) % 2.0) - 1.0) * p > yy
    elif style.frieze == "checker":
        m = ((np.floor(xx / (p / 2)) + np.floor(yy / (p / 2))) % 2).astype(bool)
    elif style.frieze == "dots":
        m = ((xx % p) - p / 2) ** 2 + (yy - p / 2) ** 2 < (p * 0.3) ** 2
    else:
        m = (np.floor(xx / (p * 0.5)) % 2).astype(bool)
    band[m] = style.accent2
    img[y0:y1] = band


def facade_texture(
    rng: Rng,
    style: FacadeStyle,
    w_m: float,
    h_m: float,
    kind: str = "side",
    arch: tuple[float, float] | None = None,
) -> np.ndarray:
    """A facade (RGBA uint8) for a wall ``w_m`` x ``h_m`` metres.

    ``kind``: ``front`` (door, emblem, signs), ``side``, ``tower`` (slit windows, clock at the top),
    ``plain``. ``arch=(width_m, height_m)`` cuts a see-through arch (alpha 0) at the bottom centre.
    """
    s = min(PPM, MAX_TEX_PX / max(w_m, h_m))
    tw, th = max(8, round(w_m * s)), max(8, round(h_m * s))
    img = _wall_base(rng, style, th, tw, s)
    fh = style.floor_h * s
    n_floors = max(1, int(h_m / style.floor_h))
    trim = tuple(float(v) for v in style.trim)
    if style.plinth_h > 0 and style.material not in ("glass",):
        ph = min(style.plinth_h, h_m * 0.3) * s
        img[th - round(ph) :] = img[th - round(ph) :] * 0.82 + style.trim * 0.1
    if style.material not in ("glass", "panels") and kind != "plain":
        n_cols = max(1, int(w_m / style.col_w))
        colw = tw / n_cols
        ww = min(style.win_w * s, colw * 0.8)
        wh = style.win_h * s
        shape = "slit" if kind == "tower" and style.win_shape in ("rect", "double") else style.win_shape
        skip_ground = kind == "front" or (style.plinth_h > 2.5)
        for f in range(n_floors):
            top = th - (f + 1) * fh
            if f == 0 and skip_ground:
                continue
            if kind == "tower" and f % 2 == 1 and n_floors > 4:
                continue
            for j in range(n_cols):
                if rng.random() < style.missing_prob:
                    continue
                x = j * colw + (colw - ww) / 2
                y = top + (fh - wh) * 0.55
                _window(img, rng, x, y, ww, wh, style, shape)
            if style.cornice_every and f % style.cornice_every == 0 and f > 0:
                yb = round(th - f * fh)
                cv2.rectangle(img, (0, yb - max(1, round(0.25 * s))), (tw, yb), trim, -1)
                img[yb : yb + max(1, round(0.15 * s))] *= 0.7
        if style.pilasters:
            pw = max(1, round(0.35 * s))
            for j in range(n_cols + 1):
                xc = round(j * colw)
                cv2.rectangle(img, (xc - pw, 0), (xc + pw, th), trim, -1)
    if style.frieze is not None and kind != "plain" and style.material != "glass":
        _frieze(img, style, th - min(n_floors, style.frieze_floor) * fh, max(3.0, 0.9 * s))
    if style.awning is not None and kind in ("front", "side"):
        ah = 1.0 * s
        y = th - 2.6 * s
        n_aw = max(1, int(w_m / style.col_w))
        for j in range(n_aw):
            x0 = j * tw / n_aw + 0.1 * tw / n_aw
            x1 = (j + 0.9) * tw / n_aw
            pts = np.array([[x0, y], [x1, y], [x1 + 0.2 * s, y + ah], [x0 - 0.2 * s, y + ah]]) * 4
            cv2.fillConvexPoly(
                img, np.round(pts).astype(np.int32), tuple(float(v) for v in style.awning), cv2.LINE_AA, 2
            )
            for k in range(0, max(1, round((x1 - x0) / (0.5 * s))), 2):
                xs = x0 + k * 0.5 * s
                cv2.rectangle(
                    img,
                    (round(xs * 4), round(y * 4)),
                    (round((xs + 0.5 * s) * 4), round((y + ah) * 4)),
                    (240.0, 240.0, 235.0),
                    -1,
                    cv2.LINE_AA,
                    2,
                )
    # top cornice
    if style.material not in ("glass",):
        cv2.rectangle(img, (0, 0), (tw, max(1, round(0.5 * s))), trim, -1)
        img[max(1, round(0.5 * s)) : max(2, round(0.7 * s))] *= 0.72
    if kind == "front":
        dw = min(tw * 0.35, rng.uniform(2.0, 4.5) * s)
        dh = min(th * 0.45, rng.uniform(3.0, 6.0) * s)
        dx = (tw - dw) / 2
        door = _pick(rng, np.array([(90, 60, 40), (60, 40, 30), (40, 50, 60), (120, 40, 30)], np.float32), 10)
        tmp_style = dataclasses.replace(style, glass=door, lit_prob=0.0, shutters=None)
        _window(img, rng, dx, th - dh, dw, dh, tmp_style, "arch" if style.door_arched else "rect")
        r = min(tw * 0.2, th * 0.16, 6.0 * s)
        ey = th - dh - r * 1.3 - 2
        if ey - r > 0:
            _emblem(img, rng, tw / 2, ey, r, style)
        for _ in range(int(rng.integers(1, 4))):
            sw = rng.uniform(1.5, 5.0) * s
            sh = rng.uniform(0.5, 1.2) * s
            sx = rng.uniform(0, max(1.0, tw - sw))
            sy = th - rng.uniform(dh * 0.6, min(th * 0.9, dh + 3 * s))
            if not (dx - sw < sx < dx + dw):
                _sign(img, rng, sx, sy, sw, sh, style)
    elif kind == "tower" and style.emblem in ("clock", "rose"):
        r = min(tw * 0.3, 3.0 * s)
        if th > 6 * r:
            _emblem(img, rng, tw / 2, r * 1.8, r, style)
    elif kind == "side" and rng.random() < 0.3:
        sw = rng.uniform(1.5, 4.0) * s
        _sign(
            img,
            rng,
            rng.uniform(0, max(1.0, tw - sw)),
            th - rng.uniform(2.5, 4.0) * s,
            sw,
            rng.uniform(0.5, 1.0) * s,
            style,
        )
    alpha = None
    if arch is not None:
        aw, ah = arch[0] * s, arch[1] * s
        alpha = np.full((th, tw), 255, np.uint8)
        r = aw / 2
        cx = tw / 2
        cv2.rectangle(
            alpha,
            (round((cx - r) * 4), round((th - ah + r) * 4)),
            (round((cx + r) * 4), th * 4),
            0,
            -1,
            cv2.LINE_AA,
            2,
        )
        cv2.ellipse(
            alpha,
            (round(cx * 4), round((th - ah + r) * 4)),
            (round(r * 4), round(r * 4)),
            0,
            180,
            360,
            0,
            -1,
            cv2.LINE_AA,
            2,
        )
        cv2.ellipse(
            img,
            (round(cx * 4), round((th - ah + r) * 4)),
            (round(r * 4 + 6), round(r * 4 + 6)),
            0,
            180,
            360,
            trim,
            3,
            cv2.LINE_AA,
            2,
        )
    return _rgba(img, alpha)


def ground_texture(rng: Rng, kind: str | None = None) -> tuple[np.ndarray, float]:
    """A tileable ground texture (RGBA uint8) and its tile size in metres."""
    kind = kind or str(rng.choice(["paving", "grass", "asphalt", "cobbles", "gravel"]))
    n = 64
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    # periodic noise: sum of integer-frequency sinusoids
    noise = np.zeros((n, n), np.float32)
    for _ in range(6):
        fx, fy = rng.integers(1, 7, 2)
        ph = rng.uniform(0, 2 * math.pi)
        noise += np.sin(2 * math.pi * (fx * xx + fy * yy) / n + ph).astype(np.float32)
    noise /= 3
    grain = rng.normal(0, 1, (n, n)).astype(np.float32)
    if kind == "grass":
        base = np.array([70, 110, 50], np.float32) * rng.uniform(0.8, 1.2)
        img = base * (1 + 0.12 * noise + 0.12 * grain)[..., None]
        tile = 3.0
    elif kind == "asphalt":
        base = np.array([85, 85, 88], np.float32) * rng.uniform(0.8, 1.2)
        img = base * (1 + 0.05 * noise + 0.1 * grain)[..., None]
        tile = 4.0
    elif kind == "gravel":
        base = np.array([170, 160, 140], np.float32) * rng.uniform(0.85, 1.1)
        img = base * (1 + 0.06 * noise + 0.16 * grain)[..., None]
        tile = 3.0
    else:
        base = _pick(
            rng,
            np.array([(190, 180, 165), (160, 150, 140), (200, 190, 170), (140, 120, 110)], np.float32),
            10,
        )
        img = base * (1 + 0.05 * noise + 0.06 * grain)[..., None]
        step = 8 if kind == "paving" else 4
        joint = ((xx % (n / step)) < 1) | ((yy % (n / step)) < 1)
        img[joint] *= 0.75
        tile = 4.0 if kind == "paving" else 2.0
    return _rgba(img), tile


def sprite(rng: Rng, kind: str) -> tuple[np.ndarray, float, float]:
    """A billboard sprite (RGBA uint8) with its world width and height in metres.

    ``kind``: ``tree``, ``person``, ``pole``, ``car``, ``bush``.
    """
    if kind == "tree":
        h_m = float(rng.uniform(4, 14))
        w_m = h_m * float(rng.uniform(0.45, 0.8))
        H, W = 96, max(8, round(96 * w_m / h_m))
        img = np.zeros((H, W, 3), np.float32)
        a = np.zeros((H, W), np.uint8)
        trunk = np.array([90, 70, 50], np.float32) * rng.uniform(0.7, 1.2)
        tw = max(1, W // 10)
        cv2.rectangle(img, (W // 2 - tw, H // 2), (W // 2 + tw, H), tuple(float(v) for v in trunk), -1)
        cv2.rectangle(a, (W // 2 - tw, H // 2), (W // 2 + tw, H), 255, -1)
        green = np.array([60, 100, 45], np.float32) * rng.uniform(0.6, 1.3, 3)
        conifer = rng.random() < 0.3
        for _ in range(int(rng.integers(6, 14))):
            if conifer:
                cy = rng.uniform(0.1, 0.75) * H
                half = (cy / H) * W * 0.5
                pts = np.array(
                    [[W / 2, cy - H * 0.2], [W / 2 + half, cy + H * 0.1], [W / 2 - half, cy + H * 0.1]]
                )
                pts_i = np.round(pts).astype(np.int32)
                col = green * rng.uniform(0.7, 1.2)
                cv2.fillConvexPoly(img, pts_i, tuple(float(v) for v in col), cv2.LINE_AA)
                cv2.fillConvexPoly(a, pts_i, 255, cv2.LINE_AA)
            else:
                cx = rng.uniform(0.25, 0.75) * W
                cy = rng.uniform(0.15, 0.55) * H
                r = rng.uniform(0.18, 0.32) * W
                col = green * rng.uniform(0.7, 1.25)
                cv2.circle(
                    img, (round(cx), round(cy)), round(r), tuple(float(v) for v in col), -1, cv2.LINE_AA
                )
                cv2.circle(a, (round(cx), round(cy)), round(r), 255, -1, cv2.LINE_AA)
        img *= (1 + 0.15 * rng.normal(0, 1, (H, W)))[..., None].astype(np.float32)
        return np.dstack([np.clip(img, 0, 255).astype(np.uint8), a]), w_m, h_m
    if kind == "person":
        h_m = float(rng.uniform(1.5, 1.9))
        w_m = h_m * 0.4
        H, W = 64, 26
        img, a = _person(rng, H, W)
        return np.dstack([img, a]), w_m, h_m
    if kind == "pole":
        h_m = float(rng.uniform(3.5, 6))
        w_m = 0.8
        H, W = 64, 12
        img = np.zeros((H, W, 3), np.uint8)
        a = np.zeros((H, W), np.uint8)
        pole_col = tuple(
            float(v) for v in _pick(rng, np.array([(40, 40, 40), (60, 70, 60), (30, 40, 60)], np.float32))
        )
        cv2.rectangle(img, (W // 2 - 1, 4), (W // 2, H), pole_col, -1)
        cv2.rectangle(a, (W // 2 - 1, 4), (W // 2, H), 255, -1)
        cv2.rectangle(img, (1, 0), (W - 2, 6), pole_col, -1)
        cv2.rectangle(a, (1, 0), (W - 2, 6), 255, -1)
        if rng.random() < 0.5:  # a sign on the pole
            sc = tuple(float(v) for v in _pick(rng, ACCENTS, 10))
            cv2.rectangle(img, (0, 14), (W - 1, 26), sc, -1)
            cv2.rectangle(a, (0, 14), (W - 1, 26), 255, -1)
        return np.dstack([img, a]), w_m, h_m
    if kind == "car":
        h_m = 1.5
        w_m = float(rng.uniform(3.8, 4.8))
        H, W = 30, round(30 * w_m / h_m)
        img = np.zeros((H, W, 3), np.uint8)
        a = np.zeros((H, W), np.uint8)
        body = tuple(float(v) for v in _pick(rng, np.concatenate([ACCENTS, TRIMS]), 15))
        cv2.rectangle(img, (0, H // 3), (W - 1, H - 6), body, -1)
        cv2.rectangle(a, (0, H // 3), (W - 1, H - 6), 255, -1)
        roof = np.array([[W * 0.22, H // 3], [W * 0.32, 2], [W * 0.72, 2], [W * 0.85, H // 3]], np.int32)
        cv2.fillConvexPoly(img, roof, body)
        cv2.fillConvexPoly(a, roof, 255)
        cv2.fillConvexPoly(
            img,
            np.array([[W * 0.28, H // 3 - 1], [W * 0.35, 5], [W * 0.7, 5], [W * 0.8, H // 3 - 1]], np.int32),
            (50.0, 60.0, 70.0),
        )
        for cx in (W * 0.2, W * 0.8):
            cv2.circle(img, (round(cx), H - 7), 6, (20.0, 20.0, 20.0), -1, cv2.LINE_AA)
            cv2.circle(a, (round(cx), H - 7), 6, 255, -1, cv2.LINE_AA)
        return np.dstack([img, a]), w_m, h_m
    # bush
    h_m = float(rng.uniform(0.8, 2.0))
    w_m = h_m * float(rng.uniform(1.2, 2.5))
    H, W = 32, round(32 * w_m / h_m)
    img = np.zeros((H, W, 3), np.float32)
    a = np.zeros((H, W), np.uint8)
    green = np.array([55, 95, 45], np.float32) * rng.uniform(0.7, 1.3, 3)
    for _ in range(8):
        cx, cy, r = rng.uniform(0.15, 0.85) * W, rng.uniform(0.45, 0.8) * H, rng.uniform(0.25, 0.45) * H
        cv2.circle(
            img,
            (round(cx), round(cy)),
            round(r),
            tuple(float(v) for v in green * rng.uniform(0.7, 1.2)),
            -1,
            cv2.LINE_AA,
        )
        cv2.circle(a, (round(cx), round(cy)), round(r), 255, -1, cv2.LINE_AA)
    return np.dstack([np.clip(img, 0, 255).astype(np.uint8), a]), w_m, h_m


def _person(rng: Rng, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """A standing figure (H, W) RGB uint8 and its alpha."""
    img = np.zeros((H, W, 3), np.uint8)
    a = np.zeros((H, W), np.uint8)
    skin = tuple(float(v) for v in _pick(rng, SKIN, 8))
    shirt = tuple(float(v) for v in _pick(rng, np.concatenate([ACCENTS, TRIMS, GLASS]), 20))
    pants = tuple(float(v) for v in _pick(rng, np.concatenate([GLASS, TRIMS[2:]]), 15))
    hair = tuple(
        float(v)
        for v in _pick(
            rng, np.array([(30, 20, 15), (90, 60, 30), (200, 170, 110), (120, 120, 120)], np.float32), 10
        )
    )
    cx = W / 2
    head_r = H * 0.075
    sc = 4

    def P(x: float, y: float) -> tuple[int, int]:
        return round(x * sc), round(y * sc)

    sway = rng.uniform(-0.12, 0.12) * W
    for im, col_head, col_hair, col_shirt, col_pants in (
        (img, skin, hair, shirt, pants),
        (a, 255, 255, 255, 255),
    ):
        legs_w = max(1, round(W * 0.13 * sc))
        cv2.line(
            im, P(cx - W * 0.1, H * 0.55), P(cx - W * 0.12 + sway, H - 2), col_pants, legs_w, cv2.LINE_AA, 2
        )
        cv2.line(
            im, P(cx + W * 0.1, H * 0.55), P(cx + W * 0.12 - sway, H - 2), col_pants, legs_w, cv2.LINE_AA, 2
        )
        cv2.ellipse(im, P(cx, H * 0.38), P(W * 0.26, H * 0.2), 0, 0, 360, col_shirt, -1, cv2.LINE_AA, 2)
        arm_w = max(1, round(W * 0.1 * sc))
        cv2.line(im, P(cx - W * 0.24, H * 0.26), P(cx - W * 0.38, H * 0.55), col_shirt, arm_w, cv2.LINE_AA, 2)
        cv2.line(im, P(cx + W * 0.24, H * 0.26), P(cx + W * 0.38, H * 0.55), col_shirt, arm_w, cv2.LINE_AA, 2)
        cv2.circle(im, P(cx, H * 0.1), round(head_r * sc), col_head, -1, cv2.LINE_AA, 2)
        cv2.ellipse(im, P(cx, H * 0.085), P(head_r, head_r * 0.7), 0, 180, 360, col_hair, -1, cv2.LINE_AA, 2)
    return img, a


# --------------------------------------------------------------------------------------------------
# Building blocks of scenes
# --------------------------------------------------------------------------------------------------


def _side_faces(
    base: np.ndarray, y0: float, y1: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """For a convex base polygon (N, 2) in (x, z), counter-clockwise seen from above: per side
    (origin top-left, u, v, width) oriented so the texture reads left-to-right from outside."""
    out = []
    n = len(base)
    centroid = base.mean(axis=0)
    for i in range(n):
        p0, p1 = base[i], base[(i + 1) % n]
        a = np.array([p0[0], y1, p0[1]])
        b = np.array([p1[0], y1, p1[1]])
        mid = 0.5 * (p0 + p1)
        outward = np.array([mid[0] - centroid[0], 0.0, mid[1] - centroid[1]])
        right = _cross(-_unit(outward), _UP)
        if float((b - a) @ right) < 0:
            a, b = b, a
        v = np.array([0.0, y0 - y1, 0.0])
        out.append((a, b - a, v, float(np.linalg.norm(b - a))))
    return out


def add_prism(
    scene: Scene,
    rng: Rng,
    style: FacadeStyle,
    base: np.ndarray,
    y0: float,
    y1: float,
    front_side: int | None = None,
    kind: str = "side",
    roof: str = "flat",
    roof_h: float = 0.0,
    share_textures: bool = False,
) -> None:
    """Walls of a prism with base polygon ``base`` (N, 2) from height ``y0`` to ``y1`` and its roof.

    ``roof``: ``flat``, ``gable`` (4-sided bases), ``pyramid``, ``dome``, ``none``.
    """
    sides = _side_faces(base, y0, y1)
    scene.solids.append((np.asarray(base, float), y0, y1 + roof_h))
    cache: dict[int, int] = {}
    for i, (o, u, v, w) in enumerate(sides):
        k = "front" if i == front_side else kind
        key = round(w * 10)
        if share_textures and k != "front" and key in cache:
            tex = cache[key]
        else:
            tex = scene.add_texture(facade_texture(rng, style, w, y1 - y0, k))
            cache[key] = tex
        scene.faces.append(TexFace(o, u, v, tex))
        if k == "front":
            scene.details.append(o + 0.5 * u + 0.75 * v)
    top = np.array([[p[0], y1, p[1]] for p in base])
    centroid = top.mean(axis=0)
    if roof == "flat" or roof_h <= 0:
        scene.faces.append(
            FlatFace(top, style.roof * 0.8 if roof == "flat" else style.trim * 0.8, _UP.copy())
        )
    elif roof == "pyramid":
        apex = centroid + np.array([0.0, roof_h, 0.0])
        for i in range(len(top)):
            tri = np.stack([top[i], top[(i + 1) % len(top)], apex])
            scene.faces.append(FlatFace(tri, style.roof, _tri_normal(tri, centroid)))
    elif roof == "dome":
        r = float(np.min(np.linalg.norm(top[:, [0, 2]] - centroid[[0, 2]], axis=1)))
        add_lathe(
            scene,
            centroid,
            [
                (r, 0.0),
                (r * 0.97, roof_h * 0.3),
                (r * 0.85, roof_h * 0.6),
                (r * 0.55, roof_h * 0.87),
                (0.0, roof_h),
            ],
            style.roof,
        )
    elif roof == "gable" and len(base) == 4:
        xs, zs = top[:, 0], top[:, 2]
        x0, x1, z0, z1 = xs.min(), xs.max(), zs.min(), zs.max()
        ridge_h = y1 + roof_h
        if x1 - x0 >= z1 - z0:
            zm = (z0 + z1) / 2
            r0, r1 = np.array([x0, ridge_h, zm]), np.array([x1, ridge_h, zm])
            for ze in (z0, z1):
                quad = np.array([[x0, y1, ze], [x1, y1, ze], r1, r0])
                scene.faces.append(FlatFace(quad, style.roof, _tri_normal(quad[:3], centroid)))
            for xe, ridge in ((x0, r0), (x1, r1)):
                tri = np.array([[xe, y1, z0], [xe, y1, z1], ridge])
                scene.faces.append(
                    FlatFace(tri, style.wall * 0.95, np.array([np.sign(xe - centroid[0]), 0, 0.0]))
                )
        else:
            xm = (x0 + x1) / 2
            r0, r1 = np.array([xm, ridge_h, z0]), np.array([xm, ridge_h, z1])
            for xe in (x0, x1):
                quad = np.array([[xe, y1, z0], [xe, y1, z1], r1, r0])
                scene.faces.append(FlatFace(quad, style.roof, _tri_normal(quad[:3], centroid)))
            for ze, ridge in ((z0, r0), (z1, r1)):
                tri = np.array([[x0, y1, ze], [x1, y1, ze], ridge])
                scene.faces.append(
                    FlatFace(tri, style.wall * 0.95, np.array([0, 0, np.sign(ze - centroid[2])]))
                )


def _tri_normal(tri: np.ndarray, inside: np.ndarray) -> np.ndarray:
    n = _unit(_cross(tri[1] - tri[0], tri[2] - tri[0]))
    if float(n @ (tri.mean(axis=0) - inside)) < 0:
        n = -n
    return n


def add_lathe(
    scene: Scene,
    center: np.ndarray,
    profile: list[tuple[float, float]],
    color: np.ndarray,
    segments: int = 12,
) -> None:
    """A surface of revolution (dome, onion, cone, drum) from ``profile`` [(radius, height above centre)]."""
    angles = np.linspace(0, 2 * math.pi, segments + 1)
    ca, sa = np.cos(angles), np.sin(angles)
    for (r0, h0), (r1, h1) in zip(profile[:-1], profile[1:]):
        for k in range(segments):
            p = [
                center + np.array([r0 * ca[k], h0, r0 * sa[k]]),
                center + np.array([r0 * ca[k + 1], h0, r0 * sa[k + 1]]),
                center + np.array([r1 * ca[k + 1], h1, r1 * sa[k + 1]]),
                center + np.array([r1 * ca[k], h1, r1 * sa[k]]),
            ]
            verts = np.stack(p if r1 > 1e-6 else p[:3])
            mid_a = 0.5 * (angles[k] + angles[k + 1])
            slope = math.atan2(r0 - r1, h1 - h0)
            n = np.array(
                [math.cos(mid_a) * math.cos(slope), math.sin(slope), math.sin(mid_a) * math.cos(slope)]
            )
            scene.faces.append(FlatFace(verts, color * (0.93 + 0.07 * (k % 2)), _unit(n)))


def add_gate(
    scene: Scene, rng: Rng, style: FacadeStyle, cx: float, cz: float, w: float, d: float, h: float
) -> None:
    """A triumphal-arch gate: front and back faces with a see-through arch, plain sides, flat top."""
    aw, ah = w * float(rng.uniform(0.3, 0.5)), h * float(rng.uniform(0.45, 0.7))
    front_tex = scene.add_texture(facade_texture(rng, style, w, h, "plain", arch=(aw, ah)))
    # inscription on the attic
    tex = scene.textures[front_tex]
    th, tw = tex.shape[:2]
    rgb = np.ascontiguousarray(tex[..., :3])
    _sign(rgb, rng, tw * 0.2, th * 0.06, tw * 0.6, th * 0.12, style)
    for side in (-1, 1):  # reliefs either side of the opening
        rx = tw / 2 + side * (aw / w * tw / 2 + tw * 0.12) - tw * 0.06
        cv2.rectangle(
            rgb,
            (round(rx), round(th * 0.3)),
            (round(rx + tw * 0.12), round(th * 0.55)),
            tuple(float(v) for v in style.trim * 0.8),
            -1,
        )
        _emblem(rgb, rng, rx + tw * 0.06, th * 0.42, tw * 0.05, style)
    tex[..., :3] = rgb
    back_tex = scene.add_texture(facade_texture(rng, style, w, h, "plain", arch=(aw, ah)))
    side_tex = scene.add_texture(facade_texture(rng, style, d, h, "plain"))
    base = np.array(
        [
            [cx - w / 2, cz - d / 2],
            [cx + w / 2, cz - d / 2],
            [cx + w / 2, cz + d / 2],
            [cx - w / 2, cz + d / 2],
        ]
    )
    scene.solids.append((base, 0.0, h))
    for i, (o, u, v, _) in enumerate(_side_faces(base, 0.0, h)):
        t = front_tex if i == 0 else back_tex if i == 2 else side_tex
        scene.faces.append(TexFace(o, u, v, t, double_sided=i in (0, 2)))
    top = np.array([[p[0], h, p[1]] for p in base])
    scene.faces.append(FlatFace(top, style.trim * 0.8, _UP.copy()))
    scene.details.append(np.array([cx, h * 0.85, cz - d / 2]))


def add_portico(scene: Scene, rng: Rng, style: FacadeStyle, x0: float, x1: float, z: float, h: float) -> None:
    """A row of columns in front of a facade (alpha-cut plane) with a triangular pediment."""
    w = x1 - x0
    s = min(PPM, MAX_TEX_PX / max(w, h))
    tw, th = max(8, round(w * s)), max(8, round(h * s))
    img = np.empty((th, tw, 3), np.float32)
    img[:] = style.trim
    img *= (1 + 0.05 * lowfreq(rng, th, tw, 8))[..., None]
    alpha = np.zeros((th, tw), np.uint8)
    n_cols = int(rng.integers(4, 9))
    cw = tw / (n_cols * 2 - 1) * float(rng.uniform(0.6, 1.0))
    entab = round(th * 0.16)
    alpha[:entab] = 255
    for k in range(n_cols):
        xc = (k + 0.5) * tw / n_cols
        cv2.rectangle(alpha, (round(xc - cw / 2), 0), (round(xc + cw / 2), th), 255, -1)
        for f in range(3):  # fluting
            xf = round(xc - cw / 2 + (f + 1) * cw / 4)
            img[entab:, xf] *= 0.85
    img[entab - 2 : entab] *= 0.7
    _glyphs(img, rng, tw * 0.2, th * 0.03, tw * 0.6, th * 0.1, style.trim * 0.4)
    tex = scene.add_texture(_rgba(img, alpha))
    origin = np.array([x0, h, z])
    scene.faces.append(
        TexFace(origin, np.array([w, 0.0, 0.0]), np.array([0.0, -h, 0.0]), tex, double_sided=True)
    )
    ped_h = w * float(rng.uniform(0.12, 0.22))
    tri = np.array([[x0, h, z], [x1, h, z], [(x0 + x1) / 2, h + ped_h, z]])
    scene.faces.append(FlatFace(tri, style.trim * 0.95, np.array([0.0, 0.0, -1.0]), double_sided=True))
    scene.details.append(np.array([(x0 + x1) / 2, h * 0.8, z]))


def _box(cx: float, cz: float, w: float, d: float) -> np.ndarray:
    return np.array(
        [
            [cx - w / 2, cz - d / 2],
            [cx + w / 2, cz - d / 2],
            [cx + w / 2, cz + d / 2],
            [cx - w / 2, cz + d / 2],
        ]
    )


def _ngon(cx: float, cz: float, r: float, n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(a), cz + r * np.sin(a)], axis=1)


def add_tower(
    scene: Scene,
    rng: Rng,
    style: FacadeStyle,
    cx: float,
    cz: float,
    r: float,
    y0: float,
    h: float,
    sides: int | None = None,
    cap: str | None = None,
) -> float:
    """A tower (square or polygonal prism) with a cap; returns the height of its top."""
    sides = sides or int(rng.choice([4, 4, 6, 8]))
    base = _box(cx, cz, 2 * r, 2 * r) if sides == 4 else _ngon(cx, cz, r, sides, math.pi / sides)
    cap = cap or str(rng.choice(["spire", "dome", "flat", "onion", "pyramid"]))
    add_prism(
        scene,
        rng,
        style,
        base,
        y0,
        y0 + h,
        kind="tower",
        roof="none"
        if cap in ("spire", "onion")
        else ("dome" if cap == "dome" else "pyramid" if cap == "pyramid" else "flat"),
        roof_h=r * (1.2 if cap == "dome" else 1.0),
        share_textures=True,
    )
    top = y0 + h
    center = np.array([cx, top, cz])
    if cap == "spire":
        sh = r * float(rng.uniform(2.5, 6.0))
        add_lathe(scene, center, [(r * 1.05, 0.0), (0.0, sh)], style.roof, segments=sides if sides > 4 else 8)
        top += sh
    elif cap == "onion":
        add_lathe(
            scene,
            center,
            [(r * 0.8, 0.0), (r * 1.15, r * 0.6), (r * 0.9, r * 1.2), (r * 0.3, r * 1.7), (0.0, r * 2.4)],
            style.roof,
        )
        top += r * 2.4
    elif cap in ("dome", "pyramid"):
        top += r * 1.2
    scene.details.append(np.array([cx, y0 + h * 0.85, cz - r]))
    return top


def add_billboard_sprite(scene: Scene, pos: np.ndarray, img: np.ndarray, w_m: float, h_m: float) -> None:
    """A sprite standing at ``pos`` (ground point); faced to the camera at render time."""
    tex = scene.add_texture(img)
    # u and v only carry the size here; :func:`orient_billboards` turns the sprite to each camera
    scene.faces.append(
        TexFace(
            np.asarray(pos, float),
            np.array([w_m, 0.0, 0.0]),
            np.array([0.0, -h_m, 0.0]),
            tex,
            double_sided=True,
            billboard=True,
        )
    )


def orient_billboards(faces: list[TexFace | FlatFace], cam: Camera) -> list[TexFace | FlatFace]:
    """Copies of ``faces`` with billboard sprites turned to face the camera."""
    out: list[TexFace | FlatFace] = []
    right = _cross(cam.forward, _UP)
    right = _unit(right) if np.linalg.norm(right) > 1e-6 else np.array([1.0, 0.0, 0.0])
    for f in faces:
        if isinstance(f, TexFace) and f.billboard:
            w = float(np.linalg.norm(f.u))
            h = float(-f.v[1])
            u = right * w
            origin = f.origin - u / 2 + np.array([0.0, h, 0.0])
            out.append(TexFace(origin, u, np.array([0.0, -h, 0.0]), f.tex, double_sided=True))
        else:
            out.append(f)
    return out


# --------------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------------

TEMPLATES = ("palace", "cathedral", "tower", "gate", "temple", "modern", "monument", "house")
#: How often each template is drawn.
TEMPLATE_WEIGHTS = (0.18, 0.16, 0.14, 0.09, 0.13, 0.12, 0.08, 0.10)


def _build_palace(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """A palace: a long block, maybe wings, a dome and a portico. Returns the height of the structure (m)."""
    w, d = rng.uniform(30, 70), rng.uniform(14, 25)
    h = style.floor_h * int(rng.integers(2, 5))
    add_prism(
        scene,
        rng,
        style,
        _box(0, 0, w, d),
        0,
        h,
        front_side=0,
        roof=str(rng.choice(["flat", "gable"])),
        roof_h=d * 0.25,
        share_textures=True,
    )
    height = h
    if rng.random() < 0.6:  # wings
        ww = w * rng.uniform(0.25, 0.45)
        wd = rng.uniform(15, 30)
        wh = h * rng.uniform(0.6, 1.0)
        for side in (-1, 1):
            add_prism(
                scene,
                rng,
                style,
                _box(side * (w / 2 - ww / 2), -d / 2 - wd / 2 + 0.01, ww, wd),
                0,
                wh,
                roof="flat",
                share_textures=True,
            )
    if rng.random() < 0.5:
        dr = min(d, w) * rng.uniform(0.2, 0.35)
        drum_h = dr * rng.uniform(0.5, 1.0)
        add_prism(
            scene,
            rng,
            style,
            _ngon(0, 0, dr, 12),
            h,
            h + drum_h,
            kind="plain",
            roof="dome",
            roof_h=dr * rng.uniform(0.9, 1.4),
            share_textures=True,
        )
        height = h + drum_h + dr
    if rng.random() < 0.4:
        add_portico(scene, rng, style, -w * 0.18, w * 0.18, -d / 2 - 3.0, h * 0.85)
    return height


def _build_cathedral(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """A cathedral: a gabled nave, zero to two towers, maybe a crossing dome. Returns the height of the structure (m)."""
    w, d = rng.uniform(18, 32), rng.uniform(40, 80)
    h = rng.uniform(15, 28)
    add_prism(
        scene,
        rng,
        style,
        _box(0, 0, w, d),
        0,
        h,
        front_side=0,
        roof="gable",
        roof_h=w * 0.4,
        share_textures=True,
    )
    height = h + w * 0.4
    n_towers = int(rng.choice([0, 1, 2, 2]))
    tr = rng.uniform(3.0, 5.5)
    th = h * rng.uniform(1.4, 2.4)
    cap = str(rng.choice(["spire", "pyramid", "flat", "onion"]))
    if n_towers == 2:
        for side in (-1, 1):
            height = max(
                height,
                add_tower(
                    scene, rng, style, side * (w / 2 - tr * 0.6), -d / 2 + tr, tr, 0, th, sides=4, cap=cap
                ),
            )
    elif n_towers == 1:
        height = max(height, add_tower(scene, rng, style, 0, -d / 2 - tr * 0.9, tr, 0, th, cap=cap))
    if rng.random() < 0.4:
        r = w * 0.3
        add_lathe(
            scene, np.array([0, h + w * 0.3, d * 0.15]), [(r, 0), (r * 0.8, r * 0.6), (0, r)], style.roof
        )
    return height


def _build_tower(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """A tower, maybe with a base building and a balcony band. Returns the height of the structure (m)."""
    r = rng.uniform(4, 9)
    th = rng.uniform(35, 90)
    height = add_tower(scene, rng, style, 0, 0, r, 0, th)
    if rng.random() < 0.6:
        bw = r * rng.uniform(3, 6)
        bh = rng.uniform(6, 12)
        add_prism(
            scene,
            rng,
            style,
            _box(0, r * 1.2, bw, bw * 0.6),
            0,
            bh,
            front_side=0,
            roof=str(rng.choice(["flat", "gable"])),
            roof_h=bw * 0.15,
            share_textures=True,
        )
    if rng.random() < 0.3:  # balcony band
        y = th * rng.uniform(0.5, 0.8)
        add_prism(scene, rng, style, _ngon(0, 0, r * 1.25, 8), y, y + 1.5, kind="plain", roof="flat")
    return height


def _build_gate(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """A triumphal gate, maybe with a block on top. Returns the height of the structure (m)."""
    w, d, h = rng.uniform(18, 35), rng.uniform(6, 12), rng.uniform(15, 30)
    add_gate(scene, rng, style, 0, 0, w, d, h)
    height = h
    if rng.random() < 0.5:  # a quadriga-like block on top
        add_prism(scene, rng, style, _box(0, 0, w * 0.3, d * 0.5), h, h + h * 0.12, kind="plain", roof="flat")
        height = h * 1.12
    return height


def _build_temple(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """A domed temple, maybe with minarets and a portico. Returns the height of the structure (m)."""
    w = rng.uniform(25, 45)
    h = rng.uniform(10, 18)
    add_prism(scene, rng, style, _box(0, 0, w, w), 0, h, front_side=0, roof="flat", share_textures=True)
    dr = w * rng.uniform(0.28, 0.4)
    drum_h = rng.uniform(2, 8)
    add_prism(
        scene,
        rng,
        style,
        _ngon(0, 0, dr, 12),
        h,
        h + drum_h,
        kind="plain",
        roof="dome",
        roof_h=dr * rng.uniform(0.8, 1.5),
        share_textures=True,
    )
    height = h + drum_h + dr
    n_min = int(rng.choice([0, 2, 4]))
    mh = rng.uniform(1.5, 2.6) * (h + drum_h)
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)][:n_min]
    for sx, sz in corners:
        height = max(
            height,
            add_tower(
                scene,
                rng,
                style,
                sx * (w / 2 + 4),
                sz * (w / 2 + 4),
                1.8,
                0,
                mh,
                sides=8,
                cap=str(rng.choice(["spire", "onion"])),
            ),
        )
    if rng.random() < 0.5:
        add_portico(scene, rng, style, -w * 0.25, w * 0.25, -w / 2 - 3.0, h * 0.9)
    return height


def _build_modern(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """One to three modern blocks, maybe an older low building in front. Returns the height of the structure (m)."""
    height = 10.0
    n = int(rng.integers(1, 4))
    for k in range(n):
        bw, bd = rng.uniform(15, 35), rng.uniform(15, 30)
        bh = rng.uniform(30, 110)
        cx = (k - (n - 1) / 2) * rng.uniform(25, 40)
        cz = rng.uniform(-5, 15) * (k % 2)
        sides = int(rng.choice([4, 4, 6, 8]))
        base = _box(cx, cz, bw, bd) if sides == 4 else _ngon(cx, cz, bw / 2, sides, rng.uniform(0, 1))
        add_prism(
            scene,
            rng,
            style,
            base,
            0,
            bh,
            front_side=0 if k == 0 and sides == 4 else None,
            roof=str(rng.choice(["flat", "pyramid"])),
            roof_h=bw * 0.3,
            share_textures=True,
        )
        height = max(height, bh)
    if rng.random() < 0.5:
        add_prism(
            scene,
            rng,
            make_style(rng, modern=False),
            _box(0, -20, 20, 6),
            0,
            5,
            front_side=0,
            roof="flat",
            share_textures=True,
        )
    return height


def _build_monument(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """An obelisk-like column on a plinth, maybe flanked by gates. Returns the height of the structure (m)."""
    r = rng.uniform(1.5, 4.0)
    mh = rng.uniform(20, 60)
    add_prism(
        scene, rng, style, _box(0, 0, r * 5, r * 5), 0, r * 1.5, kind="plain", front_side=0, roof="flat"
    )
    height = add_tower(
        scene, rng, style, 0, 0, r, r * 1.5, mh, sides=4, cap=str(rng.choice(["pyramid", "spire"]))
    )
    for side in (-1, 1):
        if rng.random() < 0.7:
            add_gate(scene, rng, style, side * r * 6, 0, r * 3, r * 1.5, r * 3)
    return height


def _build_house(scene: Scene, rng: Rng, style: FacadeStyle) -> float:
    """An ordinary but specific building, maybe with a corner tower. Returns the height of the structure (m)."""
    w, d = rng.uniform(10, 25), rng.uniform(8, 16)
    h = style.floor_h * int(rng.integers(2, 6))
    add_prism(
        scene,
        rng,
        style,
        _box(0, 0, w, d),
        0,
        h,
        front_side=0,
        roof=str(rng.choice(["gable", "flat", "pyramid"])),
        roof_h=d * 0.35,
        share_textures=True,
    )
    height = h + d * 0.35
    if rng.random() < 0.5:
        height = max(height, add_tower(scene, rng, style, w / 2, -d / 2, rng.uniform(2, 3.5), 0, h * 1.5))
    return height


#: The structure of each template: ``builder(scene, rng, style) -> height`` adds its faces to ``scene``.
LANDMARK_BUILDERS: dict[str, Callable[[Scene, Rng, FacadeStyle], float]] = {
    "palace": _build_palace,
    "cathedral": _build_cathedral,
    "tower": _build_tower,
    "gate": _build_gate,
    "temple": _build_temple,
    "modern": _build_modern,
    "monument": _build_monument,
    "house": _build_house,
}


def build_landmark(rng: Rng, template: str | None = None) -> Scene:
    """A random landmark scene (3-D faces, textures and framing hints).

    The main facade faces -z (a camera at negative z looking +z sees it); the structure stands on y = 0
    around the origin. ``template``: a key of :data:`LANDMARK_BUILDERS` (default: drawn with
    :data:`TEMPLATE_WEIGHTS`).
    """
    template = template or str(rng.choice(TEMPLATES, p=TEMPLATE_WEIGHTS))
    builder = LANDMARK_BUILDERS.get(template)
    if builder is None:
        raise ValueError(f"unknown landmark template {template!r} (known: {', '.join(TEMPLATES)})")
    scene = Scene()
    style = make_style(rng, modern=template == "modern")
    height = builder(scene, rng, style)
    # neighbours and trees: part of the landmark's scene, generic in look
    xs = [
        f.verts[:, 0] if isinstance(f, FlatFace) else np.array([f.origin[0], (f.origin + f.u)[0]])
        for f in scene.faces
    ]
    zs = [
        f.verts[:, 2] if isinstance(f, FlatFace) else np.array([f.origin[2], (f.origin + f.u)[2]])
        for f in scene.faces
    ]
    allx, allz = np.concatenate(xs), np.concatenate(zs)
    half_w = float(max(abs(allx.min()), abs(allx.max())))
    half_d = float(max(abs(allz.min()), abs(allz.max())))
    n_nb = int(rng.integers(0, 4))
    for _ in range(n_nb):
        nstyle = make_style(rng)
        nside = float(rng.choice([-1, 1]))
        nw, nd = rng.uniform(12, 30), rng.uniform(10, 20)
        nx = nside * (half_w + nw / 2 + rng.uniform(6, 25))
        nz = rng.uniform(-half_d, half_d + 30)
        add_prism(
            scene,
            rng,
            nstyle,
            _box(nx, nz, nw, nd),
            0,
            nstyle.floor_h * int(rng.integers(2, 7)),
            roof=str(rng.choice(["flat", "gable"])),
            roof_h=nd * 0.3,
            share_textures=True,
        )
    for _ in range(int(rng.integers(0, 7))):
        img, tw_, th_ = sprite(rng, "tree" if rng.random() < 0.8 else "bush")
        ang = rng.uniform(0, 2 * math.pi)
        dist = max(half_w, half_d) + rng.uniform(4, 20)
        add_billboard_sprite(
            scene, np.array([dist * math.cos(ang), 0.0, dist * math.sin(ang)]), img, tw_, th_
        )
    scene.radius = float(math.hypot(half_w, half_d))
    scene.height = float(height)
    scene.center = np.array([0.0, height * 0.45, 0.0])
    gt, tile = ground_texture(rng)
    scene.ground_tex = scene.add_texture(gt)
    scene.ground_tile_m = tile
    return scene


# --------------------------------------------------------------------------------------------------
# Photographs
# --------------------------------------------------------------------------------------------------


def output_size(rng: Rng, size: int) -> tuple[int, int]:
    """(width, height) with the long side ``size`` and a common photo aspect ratio."""
    aspect = float(rng.choice([4 / 3, 4 / 3, 3 / 2, 1.0, 16 / 9]))
    short = max(8, round(size / aspect))
    return (size, short) if rng.random() < 0.72 else (short, size)


WEATHERS = ("clear", "clear", "clear", "clear", "overcast", "overcast", "hazy", "sunset", "dusk")


def make_lighting(rng: Rng, weather: str) -> Lighting:
    """Sun and ambient light for a weather."""
    az = rng.uniform(0, 2 * math.pi)
    el = math.radians(rng.uniform(8, 20) if weather in ("sunset", "dusk") else rng.uniform(20, 70))
    sun = np.array([math.cos(az) * math.cos(el), math.sin(el), math.sin(az) * math.cos(el)])
    white = np.ones(3)
    if weather == "clear":
        amb, direct = white * rng.uniform(0.45, 0.6), np.array([1.0, 0.97, 0.9]) * rng.uniform(0.45, 0.7)
    elif weather == "overcast":
        amb, direct = white * rng.uniform(0.75, 0.95), white * rng.uniform(0.0, 0.12)
    elif weather == "hazy":
        amb, direct = np.array([0.95, 0.95, 0.9]) * rng.uniform(0.6, 0.8), white * rng.uniform(0.15, 0.3)
    elif weather == "sunset":
        amb, direct = (
            np.array([0.7, 0.6, 0.65]) * rng.uniform(0.4, 0.55),
            np.array([1.1, 0.72, 0.45]) * rng.uniform(0.5, 0.8),
        )
    else:  # dusk
        amb, direct = (
            np.array([0.45, 0.45, 0.6]) * rng.uniform(0.3, 0.45),
            np.array([0.9, 0.6, 0.5]) * rng.uniform(0.0, 0.2),
        )
    return Lighting(sun=sun, ambient=amb.astype(np.float32), direct=direct.astype(np.float32))


SKIES = {
    "clear": ((70, 120, 205), (180, 205, 230)),
    "overcast": ((150, 155, 165), (205, 205, 210)),
    "hazy": ((165, 180, 200), (222, 222, 214)),
    "sunset": ((55, 70, 135), (252, 170, 105)),
    "dusk": ((18, 24, 60), (96, 74, 100)),
}


def sky(rng: Rng, cam: Camera, weather: str) -> np.ndarray:
    """The sky (H, W, 3) float32 for a camera: a gradient down to the horizon plus clouds."""
    H, W = cam.height, cam.width
    top, hor = (np.array(c, np.float32) for c in SKIES[weather])
    top = top * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    # elevation angle of each pixel's ray, computed at 1/4 resolution
    h4, w4 = max(2, H // 4), max(2, W // 4)
    yy, xx = np.mgrid[0:h4, 0:w4].astype(np.float32)
    xx *= W / w4
    yy *= H / h4
    Kinv = np.linalg.inv(cam.K)
    rays = np.stack([xx, yy, np.ones_like(xx)], -1) @ (Kinv.T @ cam.R)
    el = rays[..., 1] / np.linalg.norm(rays, axis=-1)
    t = np.clip(el * 2.2, 0.0, 1.0) ** 0.7
    img = (hor * (1 - t[..., None]) + top * t[..., None]).astype(np.float32)
    if weather in ("clear", "hazy", "sunset") and rng.random() < 0.7:
        cl = fractal(rng, h4, w4, 3, 3)
        cover = rng.uniform(-0.2, 0.6)
        a = np.clip((cl - (0.5 - cover)) * 2.0, 0, 1) * rng.uniform(0.5, 0.95)
        ccol = (
            np.array([250, 250, 250], np.float32)
            if weather != "sunset"
            else np.array([250, 200, 170], np.float32)
        )
        img = img * (1 - a[..., None]) + ccol * a[..., None]
    elif weather == "overcast":
        img *= (1 + 0.06 * fractal(rng, h4, w4, 3, 2))[..., None]
    return cv2.resize(img.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)


def skyline(rng: Rng, n: int, radius: tuple[float, float]) -> list[TexFace | FlatFace]:
    """Far generic buildings around the origin (hazy flat quads facing the centre)."""
    faces: list[TexFace | FlatFace] = []
    for _ in range(n):
        ang = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(*radius)
        w = rng.uniform(15, 60)
        h = rng.uniform(10, 70) if rng.random() < 0.85 else rng.uniform(70, 160)
        c = np.array([r * math.cos(ang), 0.0, r * math.sin(ang)])
        inward = -_unit(c)
        t = _cross(inward, _UP) * w / 2
        quad = np.stack([c - t, c + t, c + t + [0, h, 0], c - t + [0, h, 0]])
        col = _pick(rng, WALLS, 15) * 0.55 + np.array([150, 160, 175], np.float32) * 0.4
        faces.append(FlatFace(quad, col.astype(np.float32), inward, double_sided=True))
    return faces


def ground_face(scene: Scene) -> TexFace:
    """A large tiled ground quad for the scene's ground texture."""
    e = 3000.0
    return TexFace(
        np.array([-e, 0.0, e]),
        np.array([2 * e, 0.0, 0.0]),
        np.array([0.0, 0.0, -2 * e]),
        scene.ground_tex,
        tile_m=scene.ground_tile_m,
    )


def _inside(point: np.ndarray, scene: Scene, margin: float = 1.0) -> bool:
    """True when ``point`` lies in (or within ``margin`` of) one of the scene's solids."""
    for base, y0, y1 in scene.solids:
        if not (y0 - margin <= point[1] <= y1 + margin):
            continue
        c = base.mean(axis=0)
        p = point[[0, 2]]
        n = len(base)
        inside = True
        for i in range(n):
            a, b = base[i], base[(i + 1) % n]
            edge = b - a
            normal = np.array([edge[1], -edge[0]])
            if float(normal @ (c - a)) > 0:
                normal = -normal
            normal /= max(1e-9, float(np.hypot(*normal)))
            if float(normal @ (p - a)) > margin:
                inside = False
                break
        if inside:
            return True
    return False


def scene_coverage(cam: Camera, scene: Scene) -> float:
    """Share of the image covered by the scene's structure (sum of visible face areas, capped at 1)."""
    area = 0.0
    for face in scene.faces:
        if isinstance(face, TexFace) and (face.billboard or face.tile_m is not None):
            continue
        if not face.double_sided and float(face.normal @ (cam.C - face.center)) <= 0:
            continue
        verts = (
            face.verts
            if isinstance(face, FlatFace)
            else np.stack(
                [face.origin, face.origin + face.u, face.origin + face.u + face.v, face.origin + face.v]
            )
        )
        pc = _clip_frustum(cam, cam.to_cam(verts), margin_px=0.0)
        if len(pc) < 3:
            continue
        p = cam.project_cam(pc)
        area += 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))
    return min(1.0, area / (cam.width * cam.height))


def sample_landmark_camera(rng: Rng, scene: Scene, width: int, height: int, tries: int = 8) -> Camera:
    """A tourist's view of ``scene``: mostly from the front half, sometimes a side, back or close-up.

    Views from inside a solid, or in which the structure covers under 10% of the image, are drawn again.
    """
    cam = _sample_landmark_camera(rng, scene, width, height)
    for _ in range(tries - 1):
        if not _inside(cam.C, scene) and scene_coverage(cam, scene) >= 0.1:
            break
        cam = _sample_landmark_camera(rng, scene, width, height)
    return cam


def _sample_landmark_camera(rng: Rng, scene: Scene, width: int, height: int) -> Camera:
    r = rng.random()
    if r < 0.6:
        yaw = rng.normal(0.0, 25.0)
    elif r < 0.9:
        yaw = rng.uniform(-70, 70)
    else:
        yaw = rng.uniform(-180, 180)
    partial = rng.random() < 0.25 and len(scene.details) > 0
    hfov = float(rng.uniform(45, 75))
    extent = max(scene.radius, scene.height * 0.6)
    fit = extent / math.tan(math.radians(hfov) / 2)
    dist = fit * float(np.exp(rng.normal(-0.1, 0.3)))
    if partial:
        target = scene.details[int(rng.integers(len(scene.details)))] + rng.normal(0, 1.5, 3)
        hfov /= float(rng.uniform(1.5, 3.0))
        dist *= float(rng.uniform(0.5, 1.0))
    else:
        target = scene.center + np.array(
            [
                rng.normal(0, scene.radius * 0.12),
                rng.normal(0, scene.height * 0.12),
                rng.normal(0, scene.radius * 0.1),
            ]
        )
    dist = max(dist, scene.radius * 1.15 + 3.0)
    if rng.random() < 0.75:
        cam_h = float(rng.uniform(1.4, 1.9))
    else:
        cam_h = float(rng.uniform(5, max(8.0, scene.height * 0.9 + 15)))
    a = math.radians(yaw)
    C = np.array([target[0] - dist * math.sin(a), cam_h, target[2] - dist * math.cos(a)])
    roll = float(rng.normal(0, 2.5) if rng.random() < 0.85 else rng.normal(0, 10))
    off = (float(rng.normal(0, width * 0.08)), float(rng.normal(0, height * 0.08)))
    return look_at(C, target, width, height, hfov, roll, off)


def add_foreground(
    rng: Rng,
    cam: Camera,
    n: int,
    kinds: tuple[str, ...] = ("person", "person", "tree", "pole", "car", "bush"),
) -> list[tuple[TexFace, np.ndarray]]:
    """Random occluders between the camera and the subject: (billboard facing the camera, its sprite)."""
    faces: list[tuple[TexFace, np.ndarray]] = []
    fwd = cam.forward.copy()
    fwd[1] = 0.0
    fwd = _unit(fwd) if np.linalg.norm(fwd) > 1e-6 else np.array([0.0, 0.0, 1.0])
    right = _cross(fwd, _UP)
    focal = cam.K[0, 0]
    for _ in range(n):
        kind = str(rng.choice(kinds))
        img, w_m, h_m = sprite(rng, kind)
        d = float(rng.uniform(2.5, 40.0)) if kind != "tree" else float(rng.uniform(6, 60))
        lateral = d * float(rng.uniform(-0.6, 0.6)) * cam.width / focal
        pos = cam.C + fwd * d + right * lateral
        pos[1] = 0.0
        u = right * w_m
        faces.append(
            (
                TexFace(
                    pos - u / 2 + np.array([0.0, h_m, 0.0]),
                    u,
                    np.array([0.0, -h_m, 0.0]),
                    -1,
                    double_sided=True,
                ),
                img,
            )
        )
    return faces


def render_scene(
    rng: Rng,
    scene: Scene,
    cam: Camera,
    weather: str | None = None,
    n_occluders: int | None = None,
    far_skyline: bool = True,
) -> np.ndarray:
    """A photograph of ``scene`` from ``cam``: (H, W, 3) float32 RGB in [0, 255] (before camera effects)."""
    weather = weather or str(rng.choice(WEATHERS))
    light = make_lighting(rng, weather)
    canvas = sky(rng, cam, weather)
    textures = list(scene.textures)
    faces: list[TexFace | FlatFace] = []
    if far_skyline and rng.random() < 0.7:
        faces += skyline(rng, int(rng.integers(4, 30)), (scene.radius + 120, scene.radius + 600))
    if scene.ground_tex >= 0:
        g = ground_face(scene)
        draw_tex_face(canvas, cam, g, textures[g.tex], light.shade(_UP) * np.float32(0.95))
    faces += orient_billboards(scene.faces, cam)
    n_occ = n_occluders if n_occluders is not None else int(rng.choice([0, 0, 1, 1, 2, 3, 5]))
    for f, spr in add_foreground(rng, cam, n_occ):
        textures.append(spr)
        f.tex = len(textures) - 1
        faces.append(f)
    render_faces(canvas, cam, faces, textures, light)
    return canvas


def landmark_photo(rng: Rng, scene: Scene, size: int) -> np.ndarray:
    """One photograph of a landmark scene, camera effects applied: (H, W, 3) uint8 RGB, long side ``size``."""
    w, h = output_size(rng, size)
    cam = sample_landmark_camera(rng, scene, w, h)
    img = render_scene(rng, scene, cam)
    return camera_effects(rng, img)


# --------------------------------------------------------------------------------------------------
# Camera effects
# --------------------------------------------------------------------------------------------------


def camera_effects(rng: Rng, img: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Exposure, white balance, saturation, contrast, gamma, vignetting, blur, noise and rescaling.

    ``img``: (H, W, 3) float32 in [0, 255]. Returns (H, W, 3) uint8.
    """
    H, W = img.shape[:2]
    gains = np.exp(rng.normal(0.0, 0.07 * strength, 3) + rng.normal(0.0, 0.22 * strength)).astype(np.float32)
    x = img * gains
    sat = float(np.clip(rng.normal(1.0, 0.2 * strength), 0.4, 1.6))
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    x *= np.float32(sat)
    x += (grey * np.float32(1.0 - sat))[..., None]
    if rng.random() < 0.3:
        gy, gx = np.mgrid[0:9, 0:9].astype(np.float32) / 8.0 - 0.5
        vig = cv2.resize(
            1.0 - float(rng.uniform(0.2, 0.6)) * (gx**2 + gy**2), (W, H), interpolation=cv2.INTER_LINEAR
        )
        x *= vig[..., None]
    out = cv2.convertScaleAbs(x)
    contrast = float(np.clip(rng.normal(1.0, 0.12 * strength), 0.7, 1.35))
    gamma = float(np.exp(rng.normal(0.0, 0.12 * strength)))
    lut = np.clip((np.arange(256) / 255.0 - 0.5) * contrast + 0.5, 0.0, 1.0) ** gamma
    out = cv2.LUT(out, np.round(lut * 255).astype(np.uint8))
    r = rng.random()
    if r < 0.18:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.4, 1.3)) * strength)
    elif r < 0.24:
        k = int(rng.integers(3, 8))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1.0 / k
        M = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        rot = np.asarray(cv2.warpAffine(kern, M, (k, k)), np.float32)
        rot /= max(1e-6, float(rot.sum()))
        out = cv2.filter2D(out, -1, rot)
    if rng.random() < 0.12:
        f = float(rng.uniform(0.4, 0.7))
        small = cv2.resize(out, (max(4, round(W * f)), max(4, round(H * f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    noise = float(rng.uniform(0.0, 4.0))
    if noise > 0.5:
        n = rng.normal(0.0, noise, (H, W)).astype(np.float32)
        out = cv2.convertScaleAbs(out.astype(np.float32) + n[..., None])
    return np.ascontiguousarray(out)


def jpeg_quality(rng: Rng) -> int:
    """A JPEG quality as photos come: mostly 60-95, sometimes heavily compressed."""
    return int(rng.integers(60, 96)) if rng.random() < 0.85 else int(rng.integers(25, 60))


# --------------------------------------------------------------------------------------------------
# Out-of-domain images
# --------------------------------------------------------------------------------------------------

OOD_KINDS = ("building", "nature", "texture", "people", "indoor")
#: Mixture of out-of-domain kinds (near-miss buildings first).
OOD_WEIGHTS = (0.3, 0.17, 0.15, 0.18, 0.2)


def ood_photo(rng: Rng, size: int, kind: str) -> np.ndarray:
    """An out-of-domain image of ``kind`` (one of :data:`OOD_KINDS`): (H, W, 3) uint8 RGB."""
    w, h = output_size(rng, size)
    if kind == "building":
        scene = build_landmark(rng)
        cam = sample_landmark_camera(rng, scene, w, h)
        img = render_scene(rng, scene, cam)
    elif kind == "nature":
        img = nature_image(rng, w, h)
    elif kind == "texture":
        img = texture_image(rng, w, h)
    elif kind == "people":
        img = people_image(rng, w, h)
    elif kind == "indoor":
        img = indoor_image(rng, w, h)
    else:
        raise ValueError(f"unknown out-of-domain kind {kind!r}")
    return camera_effects(rng, img)


def nature_image(rng: Rng, W: int, H: int) -> np.ndarray:
    """Mountains, hills, lakes, sea, fields and forests (H, W, 3) float32."""
    weather = str(rng.choice(["clear", "clear", "overcast", "hazy", "sunset"]))
    cam = look_at(
        np.array([0, 1.7, 0.0]),
        np.array([0, 1.7 + rng.uniform(-5, 20), 100.0]),
        W,
        H,
        float(rng.uniform(50, 80)),
    )
    img = sky(rng, cam, weather)
    horizon = H * float(rng.uniform(0.35, 0.7))
    xs = np.arange(W, dtype=np.float32)
    haze = np.array(SKIES[weather][1], np.float32)
    n_layers = int(rng.integers(1, 4))
    yy = np.arange(H, dtype=np.float32)[:, None]
    for k in range(n_layers):
        t = (k + 1) / (n_layers + 1)
        amp = H * float(rng.uniform(0.05, 0.35)) * (1 - 0.5 * t)
        ridge = np.zeros(W, np.float32)
        for o in range(5):
            f = 2**o * rng.uniform(0.5, 1.5)
            ridge += np.sin(xs / W * 2 * math.pi * f + rng.uniform(0, 6.28)).astype(np.float32) / 2**o
        top = horizon - amp * (0.6 + 0.4 * ridge) * (1 if rng.random() < 0.8 else 0.3)
        col = _pick(
            rng, np.array([(90, 100, 110), (70, 90, 60), (110, 100, 80), (60, 80, 70)], np.float32), 15
        )
        col = col * (1 - t * 0.5) + haze * t * 0.5 if k < n_layers - 1 else col
        mask = (yy >= top[None, :]).astype(np.float32)
        tex = 1 + 0.08 * fractal(rng, H, W, 3, 8)
        if rng.random() < 0.3 and k == 0:  # snow caps
            snow = (yy < top[None, :] + amp * 0.25).astype(np.float32) * mask
            img = img * (1 - snow[..., None]) + np.float32(240) * snow[..., None]
            mask = mask * (1 - snow)
        img = img * (1 - mask[..., None]) + (col * tex[..., None]) * mask[..., None]
    fg = str(rng.choice(["lake", "sea", "field", "forest", "meadow"]))
    below = (yy >= horizon).astype(np.float32)
    if fg in ("lake", "sea"):
        water = np.array([40, 80, 120], np.float32) * rng.uniform(0.7, 1.3)
        waves = 1 + 0.1 * np.sin(yy * rng.uniform(0.5, 2.0) + lowfreq(rng, H, W, 20) * 3)
        wimg = water * waves[..., None]
        if fg == "sea":
            beach = (yy >= horizon + (H - horizon) * rng.uniform(0.4, 0.8)).astype(np.float32)
            wimg = wimg * (1 - beach[..., None]) + np.array([215, 195, 150], np.float32) * beach[..., None]
        img = img * (1 - below[..., None]) + wimg * below[..., None]
    else:
        base = np.array([80, 120, 50] if fg != "field" else [190, 170, 90], np.float32) * rng.uniform(
            0.8, 1.2
        )
        tex = 1 + 0.15 * fractal(rng, H, W, 4, 6)
        if fg == "field":
            tex *= 1 + 0.08 * np.sin(
                np.arange(W, dtype=np.float32)[None, :] * rng.uniform(0.3, 1.0) + yy * rng.uniform(-0.5, 0.5)
            )
        img = img * (1 - below[..., None]) + (base * tex[..., None]) * below[..., None]
    n_trees = int(rng.integers(0, 12)) if fg in ("forest", "meadow", "lake") else int(rng.integers(0, 3))
    if fg == "forest":
        n_trees += 12
    for _ in range(n_trees):
        spr, _, _ = sprite(rng, "tree")
        th = int(H * rng.uniform(0.1, 0.7))
        tw = max(2, round(th * spr.shape[1] / spr.shape[0]))
        spr = cv2.resize(spr, (tw, th), interpolation=cv2.INTER_AREA)
        x = int(rng.integers(-tw // 2, W - tw // 2))
        y = int(horizon + rng.uniform(0, H - horizon) * 0.6) - th
        _paste(img, spr, x, y)
    return img


def _paste(canvas: np.ndarray, spr: np.ndarray, x: int, y: int) -> None:
    """Alpha-composite an RGBA uint8 sprite with its top-left at (x, y), clipped to the canvas."""
    H, W = canvas.shape[:2]
    h, w = spr.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return
    s = spr[y0 - y : y1 - y, x0 - x : x1 - x]
    _composite(canvas, (x0, y0, x1, y1), s[..., :3].astype(np.float32), s[..., 3])


def texture_image(rng: Rng, W: int, H: int) -> np.ndarray:
    """A close-up texture filling the frame (H, W, 3) float32, sometimes seen in perspective."""
    kind = str(
        rng.choice(
            ["noise", "stripes", "checker", "cells", "weave", "bricks", "foliage", "marble", "tiles", "text"]
        )
    )
    S = max(W, H)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    c1, c2 = (
        _pick(rng, np.concatenate([WALLS, ACCENTS, GLASS]), 25),
        _pick(rng, np.concatenate([WALLS, ACCENTS]), 25),
    )
    if kind == "noise":
        t = fractal(rng, S, S, 5, 3)
        img = c1 + (c2 - c1) * np.clip(t * 0.5 + 0.5, 0, 1)[..., None]
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        f = rng.uniform(0.05, 0.4)
        t = np.sin((xx * math.cos(a) + yy * math.sin(a)) * f) > rng.uniform(-0.5, 0.5)
        img = np.where(t[..., None], c1, c2)
    elif kind == "checker":
        p = int(rng.integers(6, 40))
        t = ((xx // p + yy // p) % 2).astype(bool)
        img = np.where(t[..., None], c1, c2)
    elif kind == "cells":
        n = int(rng.integers(4, 16))
        small = rng.uniform(0, 1, (n, n)).astype(np.float32)
        lab = cv2.resize(small, (S, S), interpolation=cv2.INTER_NEAREST)
        img = c1 + (c2 - c1) * lab[..., None]
    elif kind == "weave":
        f = rng.uniform(0.2, 0.8)
        t = np.sin(xx * f) * np.sin(yy * f)
        img = c1 + (c2 - c1) * (t * 0.5 + 0.5)[..., None]
    elif kind == "bricks":
        st = make_style(rng, modern=False)
        st.material = "bricks"
        img = _wall_base(rng, st, S, S, float(rng.uniform(30, 90)))
    elif kind == "foliage":
        img = np.empty((S, S, 3), np.float32)
        img[:] = np.array([40, 70, 30], np.float32)
        for _ in range(int(rng.integers(60, 200))):
            col = np.array([60, 110, 45], np.float32) * rng.uniform(0.5, 1.4, 3)
            cv2.ellipse(
                img,
                (int(rng.integers(0, S)), int(rng.integers(0, S))),
                (int(rng.integers(3, S // 8)), int(rng.integers(2, S // 14))),
                float(rng.uniform(0, 180)),
                0,
                360,
                tuple(float(v) for v in col),
                -1,
                cv2.LINE_AA,
            )
    elif kind == "marble":
        t = np.sin(xx * rng.uniform(0.02, 0.08) + 6 * fractal(rng, S, S, 4, 3))
        img = c1 + (np.array([235, 235, 230], np.float32) - c1) * (t * 0.5 + 0.5)[..., None]
    elif kind == "tiles":
        p = int(rng.integers(10, 50))
        n = S // p + 2
        cols = np.stack([_pick(rng, np.concatenate([ACCENTS, WALLS]), 20) for _ in range(6)])
        idx = rng.integers(0, 6, (n, n))
        img = cols[idx[(yy // p).astype(int), (xx // p).astype(int)]]
        img[((xx % p) < 2) | ((yy % p) < 2)] = 220.0
    else:  # text on paper
        img = np.empty((S, S, 3), np.float32)
        img[:] = np.array([238, 234, 222], np.float32) * rng.uniform(0.85, 1.05)
        lh = float(rng.uniform(8, 24))
        y = lh
        while y < S:
            _glyphs(img, rng, lh, y, S - 2 * lh, lh * 0.8, np.full(3, 30.0), thickness=1)
            y += lh * 1.5
    img = np.asarray(img, np.float32) * (1 + 0.05 * rng.normal(0, 1, (S, S, 1))).astype(np.float32)
    if rng.random() < 0.5:  # seen in perspective
        src = np.array([[0, 0], [S, 0], [S, S], [0, S]], np.float32)
        j = S * 0.25
        dst = src + rng.uniform(-j, j, (4, 2)).astype(np.float32)
        M = cv2.getPerspectiveTransform(dst, src)
        img = cv2.warpPerspective(img, M, (S, S), borderMode=cv2.BORDER_REFLECT)
    y0, x0 = (S - H) // 2, (S - W) // 2
    return np.ascontiguousarray(img[y0 : y0 + H, x0 : x0 + W])


def people_image(rng: Rng, W: int, H: int) -> np.ndarray:
    """People-like figures or a portrait against a plain, park or street background (H, W, 3) float32."""
    bg = str(rng.choice(["wall", "park", "street", "studio"]))
    img = np.empty((H, W, 3), np.float32)
    if bg == "park":
        img[:] = np.array([90, 130, 70], np.float32)
        img *= (1 + 0.2 * fractal(rng, H, W, 4, 4))[..., None]
    elif bg == "street":
        img[:] = _pick(rng, WALLS, 20)
        img *= (1 + 0.1 * fractal(rng, H, W, 3, 6))[..., None]
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), 3), np.float32)
    else:
        c1, c2 = (
            _pick(rng, np.concatenate([WALLS, TRIMS]), 20),
            _pick(rng, np.concatenate([WALLS, TRIMS]), 20),
        )
        t = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
        img[:] = c1 * (1 - t) + c2 * t
    if rng.random() < 0.35:  # portrait
        cx, cy = W * rng.uniform(0.35, 0.65), H * rng.uniform(0.35, 0.5)
        r = min(W, H) * rng.uniform(0.18, 0.3)
        shirt = tuple(float(v) for v in _pick(rng, np.concatenate([ACCENTS, GLASS]), 20))
        cv2.ellipse(
            img,
            (round(cx), round(cy + r * 2.4)),
            (round(r * 2.0), round(r * 1.3)),
            0,
            0,
            360,
            shirt,
            -1,
            cv2.LINE_AA,
        )
        skin = _pick(rng, SKIN, 8)
        cv2.rectangle(
            img,
            (round(cx - r * 0.35), round(cy + r * 0.6)),
            (round(cx + r * 0.35), round(cy + r * 1.3)),
            tuple(float(v) for v in skin * 0.9),
            -1,
        )
        hair = tuple(
            float(v) for v in _pick(rng, np.array([(30, 20, 15), (90, 60, 30), (200, 170, 110)], np.float32))
        )
        cv2.ellipse(
            img,
            (round(cx), round(cy - r * 0.1)),
            (round(r * 0.9), round(r * 1.15)),
            0,
            0,
            360,
            hair,
            -1,
            cv2.LINE_AA,
        )
        cv2.ellipse(
            img,
            (round(cx), round(cy + r * 0.05)),
            (round(r * 0.78), round(r)),
            0,
            0,
            360,
            tuple(float(v) for v in skin),
            -1,
            cv2.LINE_AA,
        )
        for s in (-1, 1):
            ex = round(cx + s * r * 0.33)
            cv2.ellipse(
                img,
                (ex, round(cy - r * 0.05)),
                (round(r * 0.14), round(r * 0.07)),
                0,
                0,
                360,
                (245.0, 245.0, 245.0),
                -1,
                cv2.LINE_AA,
            )
            cv2.circle(
                img, (ex, round(cy - r * 0.05)), max(1, round(r * 0.06)), (40.0, 30.0, 20.0), -1, cv2.LINE_AA
            )
            cv2.line(
                img,
                (ex - round(r * 0.15), round(cy - r * 0.25)),
                (ex + round(r * 0.15), round(cy - r * 0.28)),
                hair,
                max(1, round(r * 0.04)),
                cv2.LINE_AA,
            )
        cv2.line(
            img,
            (round(cx), round(cy)),
            (round(cx - r * 0.05), round(cy + r * 0.3)),
            tuple(float(v) for v in skin * 0.8),
            max(1, round(r * 0.04)),
            cv2.LINE_AA,
        )
        cv2.ellipse(
            img,
            (round(cx), round(cy + r * 0.55)),
            (round(r * 0.25), round(r * 0.08)),
            0,
            0,
            180,
            (150.0, 60.0, 60.0),
            max(1, round(r * 0.05)),
            cv2.LINE_AA,
        )
    else:
        n = int(rng.integers(1, 7))
        for _ in range(n):
            ph = int(H * rng.uniform(0.4, 1.1))
            pw = max(4, round(ph * 0.4))
            body, a = _person(rng, 64, 26)
            spr = cv2.resize(np.dstack([body, a]), (pw, ph), interpolation=cv2.INTER_LINEAR)
            _paste(img, spr, int(rng.integers(-pw // 3, W - pw // 2)), int(H - ph * rng.uniform(0.7, 1.0)))
    return img


def indoor_image(rng: Rng, W: int, H: int) -> np.ndarray:
    """A room seen from inside (walls, floor, ceiling, windows, paintings, furniture): (H, W, 3) float32."""
    scene = Scene()
    rw, rd, rh = float(rng.uniform(4, 14)), float(rng.uniform(4, 14)), float(rng.uniform(2.6, 4.5))
    wall_col = _pick(rng, np.concatenate([WALLS, TRIMS]), 15)
    # walls (normals point inwards)
    base = _box(0, 0, rw, rd)
    for o, u, v, w in _side_faces(base, 0.0, rh):
        s = min(24.0, 256 / max(w, rh))
        tw, th = max(8, round(w * s)), max(8, round(rh * s))
        img = np.empty((th, tw, 3), np.float32)
        img[:] = wall_col
        img *= (1 + 0.03 * lowfreq(rng, th, tw, 4))[..., None]
        if rng.random() < 0.4:  # wallpaper
            p = max(3, round(rng.uniform(0.1, 0.4) * s))
            img[:, (np.arange(tw) // p) % 2 == 1] *= 0.9
        if rng.random() < 0.5:  # wainscot
            img[round(th * 0.65) :] = _pick(rng, TRIMS, 10) * 0.8
        for _ in range(int(rng.integers(0, 4))):
            kind = rng.random()
            fw, fh = rng.uniform(0.6, 2.0) * s, rng.uniform(0.5, 1.5) * s
            fx, fy = rng.uniform(0, max(1, tw - fw)), rng.uniform(0.1, 0.45) * th
            if kind < 0.4:  # window with bright outside
                cv2.rectangle(
                    img,
                    (round(fx), round(fy)),
                    (round(fx + fw), round(fy + fh * 1.5)),
                    (235.0, 240.0, 250.0),
                    -1,
                )
                cv2.rectangle(
                    img,
                    (round(fx), round(fy)),
                    (round(fx + fw), round(fy + fh * 1.5)),
                    (250.0, 250.0, 250.0),
                    max(1, round(0.06 * s)),
                )
                cv2.line(
                    img,
                    (round(fx + fw / 2), round(fy)),
                    (round(fx + fw / 2), round(fy + fh * 1.5)),
                    (250.0, 250.0, 250.0),
                    max(1, round(0.04 * s)),
                )
            elif kind < 0.8:  # painting
                sub = fractal(rng, max(2, round(fh)), max(2, round(fw)), 3, 3)
                c1, c2 = _pick(rng, ACCENTS, 30), _pick(rng, WALLS, 30)
                pic = c1 + (c2 - c1) * np.clip(sub * 0.5 + 0.5, 0, 1)[..., None]
                y0, x0 = round(fy), round(fx)
                ph, pw = pic.shape[:2]
                ph, pw = min(ph, th - y0), min(pw, tw - x0)
                img[y0 : y0 + ph, x0 : x0 + pw] = pic[:ph, :pw]
                cv2.rectangle(img, (x0, y0), (x0 + pw, y0 + ph), (120.0, 90.0, 40.0), max(1, round(0.05 * s)))
            else:  # door
                dw, dh = 0.9 * s, 2.1 * s
                dx = rng.uniform(0, max(1, tw - dw))
                cv2.rectangle(img, (round(dx), round(th - dh)), (round(dx + dw), th), (110.0, 80.0, 55.0), -1)
        tex = scene.add_texture(_rgba(img))
        # flip so the texture reads correctly from inside
        scene.faces.append(TexFace(o + u, -u, v, tex))
    floor_kind = str(rng.choice(["wood", "tiles", "carpet"]))
    n = 64
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if floor_kind == "wood":
        base_c = np.array([150, 105, 65], np.float32) * rng.uniform(0.6, 1.3)
        plank = (yy // 8).astype(int)
        table = rng.normal(1.0, 0.08, 9)
        fimg = base_c * (table[plank] * (1 + 0.05 * np.sin(xx * 0.7 + plank)))[..., None]
        fimg[(yy % 8) < 1] *= 0.7
        tile = 1.6
    elif floor_kind == "tiles":
        c1, c2 = _pick(rng, TRIMS, 10), _pick(rng, np.concatenate([TRIMS, WALLS]), 10)
        fimg = np.where((((xx // 16) + (yy // 16)) % 2 == 0)[..., None], c1, c2).astype(np.float32)
        tile = 1.2
    else:
        fimg = _pick(rng, ACCENTS, 30) * 0.6 * (1 + 0.1 * rng.normal(0, 1, (n, n, 1))).astype(np.float32)
        tile = 2.0
    scene.ground_tex = scene.add_texture(_rgba(fimg))
    scene.ground_tile_m = tile
    ceil = np.array(
        [[-rw / 2, rh, -rd / 2], [rw / 2, rh, -rd / 2], [rw / 2, rh, rd / 2], [-rw / 2, rh, rd / 2]]
    )
    scene.faces.append(FlatFace(ceil, np.array([238, 236, 230], np.float32), np.array([0.0, -1.0, 0.0])))
    for _ in range(int(rng.integers(1, 6))):  # furniture
        fw, fd, fh = rng.uniform(0.5, 2.5), rng.uniform(0.4, 1.2), rng.uniform(0.4, 2.0)
        fx, fz = (
            rng.uniform(-rw / 2 + fw / 2, rw / 2 - fw / 2),
            rng.uniform(-rd / 2 + fd / 2, rd / 2 - fd / 2),
        )
        col = _pick(
            rng,
            np.array(
                [(110, 80, 55), (60, 60, 65), (160, 140, 120), (120, 40, 40), (40, 60, 100)], np.float32
            ),
            15,
        )
        b = _box(fx, fz, fw, fd)
        for o, u, v, _ in _side_faces(b, 0.0, fh):
            quad = np.stack([o, o + u, o + u + v, o + v])
            scene.faces.append(FlatFace(quad, col, _unit(_cross(v, u))))
        scene.faces.append(FlatFace(np.array([[p[0], fh, p[1]] for p in b]), col * 1.1, _UP.copy()))
    C = np.array(
        [
            rng.uniform(-rw / 2 + 0.5, rw / 2 - 0.5),
            rng.uniform(1.2, 1.8),
            rng.uniform(-rd / 2 + 0.5, rd / 2 - 0.5),
        ]
    )
    ang = rng.uniform(0, 2 * math.pi)
    target = C + np.array([math.cos(ang), rng.uniform(-0.3, 0.2), math.sin(ang)])
    cam = look_at(C, target, W, H, float(rng.uniform(55, 90)), float(rng.normal(0, 3)))
    light = Lighting(
        sun=_unit(np.array([0.3, 1.0, 0.2])),
        ambient=np.ones(3, np.float32) * np.float32(rng.uniform(0.6, 0.9)),
        direct=np.array([1.0, 0.92, 0.8], np.float32) * np.float32(rng.uniform(0.1, 0.35)),
    )
    canvas = np.zeros((H, W, 3), np.float32)
    canvas[:] = 200.0
    g = TexFace(
        np.array([-rw / 2, 0.0, rd / 2]),
        np.array([rw, 0.0, 0.0]),
        np.array([0.0, 0.0, -rd]),
        scene.ground_tex,
        tile_m=tile,
    )
    draw_tex_face(canvas, cam, g, scene.textures[g.tex], light.shade(_UP))
    render_faces(canvas, cam, scene.faces, scene.textures, light)
    return canvas

"""The app's routes, one `APIRouter` per part of the API (included by `serving.app.create_app`)."""

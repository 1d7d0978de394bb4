// An XMLHttpRequest for Node that behaves like a browser's while a response streams in.
//
// Google's grpc-web runtime reads a text-mode stream from `responseText` on every
// `readystatechange` in the LOADING state, as browsers allow. xhr2 (the XMLHttpRequest that
// grpc-web's own Node tests use) fills `responseText` only when the response has ended and
// fires LOADING once, so under plain xhr2 a stream would arrive all at once at its end. This
// subclass updates `responseText` and fires `readystatechange` on every chunk, as Chromium does.

import XHR2 from "xhr2";

export class StreamingXMLHttpRequest extends XHR2 {
  _onHttpResponseData(response, data) {
    if (this._response !== response) {
      return;
    }
    this._responseParts.push(data);
    this._loadedBytes += data.length;
    if (this.responseType === "" || this.responseType === "text") {
      this.responseText = Buffer.concat(this._responseParts).toString("utf8");
    }
    this._setReadyState(XHR2.LOADING);
    this._dispatchProgress("progress");
  }
}
